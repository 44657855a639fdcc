//! Any bytes as a policy file: `Policy::parse` returns the policy or positioned errors,
//! never panics; an accepted policy's derived views work too.
#![no_main]

use k8s_ebpf::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse(text, "fuzz.yaml") {
        Ok(policy) => {
            let _ = policy.watched_ports();
            let _ = policy.window();
            let _ = policy.scan();
            for rule in policy.rules() {
                let _ = policy.rule(rule.port);
            }
        }
        Err(errors) => {
            let _ = errors.to_string();
        }
    }
});

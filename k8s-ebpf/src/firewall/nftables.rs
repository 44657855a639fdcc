//! nftables: one `inet` table of the project's own, replaced whole on each load.
//!
//! Per watched port, an interval set of allowed IPv4 sources and one of IPv6 sources; the
//! input chain accepts established and related traffic first, then everything arriving on
//! `lo` (the node reaching itself, its own addresses included), then each port's allowed
//! sources; what is left for the port is counted in a named counter, logged to an NFLOG
//! group and let through (audit) or dropped (enforce). Other ports are not touched: the chain's
//! policy is accept.
//!
//! Facts it rests on (nft 1.0.6, checked with `nft -c`): `table inet T {}` followed by
//! `delete table inet T` in one file replaces the table atomically whether or not it
//! existed; `flags interval` sets hold CIDRs, `auto-merge` joins adjacent ones; rule
//! comments hold at most 128 bytes.

use std::fmt::Write as _;

use super::{comment_text, origin, Allowlist, Mode, Options, Resolved, TABLE};
use crate::policy::Policy;

/// nftables refuses longer rule comments.
const COMMENT_MAX: usize = 120;

/// The set holding a port's allowed sources of one family.
pub fn set_name(port: u16, v6: bool) -> String {
    format!("peers_{port}_{}", if v6 { "v6" } else { "v4" })
}

/// The counter of a port's unexpected attempts.
pub fn counter_name(port: u16) -> String {
    format!("unexpected_{port}")
}

/// The ruleset, ready for `nft -f`.
pub fn render(resolved: &Resolved, policy: &Policy, options: &Options) -> String {
    let mut out = String::new();
    let w = &mut out;
    write_header(w, resolved, policy, options);
    let _ = writeln!(w, "table inet {TABLE} {{}}");
    let _ = writeln!(w, "delete table inet {TABLE}");
    let _ = writeln!(w, "table inet {TABLE} {{");
    for list in &resolved.ports {
        write_sets(w, list);
        let _ = writeln!(w, "\tcounter {} {{}}", counter_name(list.port));
    }
    let _ = writeln!(w, "\tchain input {{");
    let _ = writeln!(
        w,
        "\t\ttype filter hook input priority filter; policy accept;"
    );
    let _ = writeln!(
        w,
        "\t\tct state established,related accept comment \"replies and connections already accepted\""
    );
    let _ = writeln!(
        w,
        "\t\tiif \"lo\" accept comment \"the node itself (loopback and its own addresses)\""
    );
    for list in &resolved.ports {
        write_port_rules(w, list, options);
    }
    let _ = writeln!(w, "\t}}");
    let _ = writeln!(w, "}}");
    out
}

/// The comment block on top: what wrote the file, what it does in this mode, what it
/// could not express and how to remove it.
fn write_header(w: &mut String, resolved: &Resolved, policy: &Policy, options: &Options) {
    let _ = writeln!(w, "#!/usr/sbin/nft -f");
    let _ = writeln!(
        w,
        "# Written by `{}` at {} from {}.",
        comment_text(&options.command, 400),
        options.generated_at,
        comment_text(policy.origin(), 200)
    );
    let _ = writeln!(
        w,
        "# Inbound TCP to the policy's watched ports: the sources each rule's expected_peers \
         admits are accepted;"
    );
    match options.mode {
        Mode::Audit => {
            let _ = writeln!(
                w,
                "# mode audit: every other source is counted (`nft list counters table inet {TABLE}`) \
                 and logged to NFLOG group {}, and let through.",
                options.log_group
            );
        }
        Mode::Enforce => {
            let _ = writeln!(
                w,
                "# mode enforce: every other source is counted (`nft list counters table inet {TABLE}`), \
                 logged to NFLOG group {} and dropped; the monitor does not see dropped SYNs.",
                options.log_group
            );
        }
    }
    let _ = writeln!(
        w,
        "# Traffic on lo (the node itself, its own addresses too) is always accepted, also on \
         ports whose rule does not expect loopback."
    );
    if resolved.from_api {
        let _ = writeln!(
            w,
            "# Kubernetes selectors are a SNAPSHOT of the addresses the API gave at {}: \
             re-run the command above and `nft -f` its output whenever nodes or pods change.",
            options.generated_at
        );
    }
    for warning in warnings(resolved) {
        let _ = writeln!(w, "# NOT EXPRESSED: {}", comment_text(&warning, 400));
    }
    let _ = writeln!(w, "# Remove with: nft delete table inet {TABLE}");
}

/// A port's rules: its allowed sources of each family accepted, the rest counted, logged
/// and (enforce) dropped.
fn write_port_rules(w: &mut String, list: &Allowlist, options: &Options) {
    let why = comment_text(
        &format!("rule {}: {}", list.rule, origin(list)),
        COMMENT_MAX,
    );
    for v6 in [false, true] {
        let (family, name) = (if v6 { "ip6" } else { "ip" }, set_name(list.port, v6));
        let _ = writeln!(
            w,
            "\t\ttcp dport {} {family} saddr @{name} accept comment \"{why}\"",
            list.port
        );
    }
    // Both modes log to the NFLOG group: under enforce the monitor never sees a dropped
    // SYN (netfilter's input hook runs before the socket lookup), so the group and the
    // counter are where blocked attempts show.
    let log = format!(
        "log prefix \"k8s-ebpf {}: \" group {}",
        prefix_text(&list.rule),
        options.log_group
    );
    let verdict = match options.mode {
        Mode::Audit => log,
        Mode::Enforce => format!("{log} drop"),
    };
    let unexpected = comment_text(
        &format!(
            "rule {} ({}): unexpected peer",
            list.rule,
            options.mode.as_str()
        ),
        COMMENT_MAX,
    );
    let _ = writeln!(
        w,
        "\t\ttcp dport {} counter name \"{}\" {verdict} comment \"{unexpected}\"",
        list.port,
        counter_name(list.port)
    );
}

/// A rule name as a log prefix: nft expands `$name` inside prefixes (a variable), so only
/// letters, digits and `-_.` are kept, the rest `_`, at most 40 bytes.
fn prefix_text(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

fn write_sets(w: &mut String, list: &Allowlist) {
    let v4: Vec<String> = list.resolved_v4.iter().map(ToString::to_string).collect();
    let v6: Vec<String> = list.resolved_v6.iter().map(ToString::to_string).collect();
    for (v6_set, elements) in [(false, v4), (true, v6)] {
        let _ = writeln!(w, "\tset {} {{", set_name(list.port, v6_set));
        let _ = writeln!(
            w,
            "\t\ttype {}; flags interval; auto-merge;",
            if v6_set { "ipv6_addr" } else { "ipv4_addr" }
        );
        let _ = writeln!(
            w,
            "\t\tcomment \"{}\"",
            comment_text(
                &format!("rule {}: {}", list.rule, origin(list)),
                COMMENT_MAX
            )
        );
        if !elements.is_empty() {
            let _ = writeln!(w, "\t\telements = {{ {} }}", elements.join(", "));
        }
        let _ = writeln!(w, "\t}}");
    }
}

/// What the ruleset does not express, one sentence each.
pub fn warnings(resolved: &Resolved) -> Vec<String> {
    let mut out = resolved.warnings();
    for list in resolved.ports.iter().filter(|l| !l.loopback) {
        out.push(format!(
            "rule {} (port {}): loopback is not expected, but `iif lo accept` lets the node reach \
             itself on every port (the monitor still alerts on it)",
            list.rule, list.port
        ));
    }
    out
}

//! The `k8s-ebpf` command line.

use std::{
    collections::BTreeSet, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use k8s_ebpf::{
    capture::{
        reader::{Reader, ReaderStats},
        AttachMode, Capture, CaptureConfig, CaptureError, NetnsScope, StateHook, SynHook,
    },
    daemon::{self, DaemonConfig, UsageError},
    firewall,
    identity::{self, ApiMode, Identities},
    metrics::DEFAULT_METRICS_ADDR,
    output::{Destination, Format, Rotation, DEFAULT_KEEP, DEFAULT_MAX_BYTES},
    policy::{Policy, Profile, ProfileChoice},
};
use tokio::sync::{mpsc, watch};

/// Exit status for bad command lines and configuration (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(name = "k8s-ebpf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the monitor: attach, judge every connection on watched ports against the
    /// policy, write ECS JSON alerts, serve metrics and health.
    Run(RunArgs),
    /// Validate a policy file; prints each error as file:line:column.
    CheckConfig {
        /// The policy file.
        file: PathBuf,
        /// Check the file layered on this profile (kubeadm, eks, gke, aks, k3s), as
        /// `run --profile NAME --policy FILE` runs it.
        #[arg(long)]
        profile: Option<String>,
    },
    /// List the distribution profiles, one a line; with NAME, print that profile's
    /// policy as YAML (a complete policy: `check-config` accepts it).
    Profiles {
        /// kubeadm, eks, gke, aks or k3s.
        name: Option<String>,
    },
    /// Print the Kubernetes port knowledge base.
    Ports {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The TCP listeners on watched ports right now (this network namespace), their
    /// owners and bind scope, and findings where they are weaker than the hardened default;
    /// and the watched ports of this node forwarded elsewhere (conntrack's table, and the
    /// Kubernetes API's hostPorts, externalIPs and NodePorts).
    Exposure {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Also connect to each listener and record what it answers without credentials:
        /// TLS and certificate, and the status of a few unauthenticated GETs.
        #[arg(long)]
        probe: bool,
        /// Watched ports from this policy (default: the embedded policy's).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// This node's name in the Kubernetes API (its pods' hostPorts are read).
        #[arg(long, default_value_t = daemon::default_hostname())]
        hostname: String,
        /// Where the pods' hostPorts and the Services' externalIPs and NodePorts that
        /// forward this node's watched ports are read from.
        #[command(flatten)]
        kubernetes: KubernetesArgs,
    },
    /// Watch for a while, then write a policy that expects everything seen (the base
    /// policy widened by each peer, client process and listener it would have alerted on).
    Learn(LearnArgs),
    /// Print raw capture records as JSON lines (a debugging and test tool).
    Capture(CaptureArgs),
    /// Write host firewall policy (nftables, Cilium, Calico) for the watched ports' inbound
    /// side: each rule's expected peers allowed, everyone else counted and logged (audit)
    /// or dropped (enforce).
    Firewall(FirewallArgs),
}

#[derive(clap::Args)]
struct FirewallArgs {
    /// nftables (an `inet` table for `nft -f`), cilium (CiliumClusterwideNetworkPolicy)
    /// or calico (GlobalNetworkPolicy for host endpoints).
    #[arg(long, value_enum, default_value = "nftables")]
    format: firewall::Format,
    /// audit: count and log unexpected peers, let them through; enforce: drop them.
    #[arg(long, value_enum, default_value = "audit")]
    mode: firewall::Mode,
    /// Policy file (YAML), layered as `run` layers it; default: the embedded policy.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Distribution profile (kubeadm, eks, gke, aks, k3s): its policy, or the base the
    /// file is layered on, as with `run --profile NAME`.
    #[arg(long)]
    profile: Option<ProfileChoice>,
    /// NFLOG group the nftables audit mode logs to.
    #[arg(long, default_value_t = firewall::DEFAULT_LOG_GROUP)]
    log_group: u16,
    /// Write here instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    kubernetes: KubernetesArgs,
}

#[derive(clap::Args)]
struct LearnArgs {
    /// How long to watch (e.g. 10m, 1h).
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// Where to write the learned policy.
    #[arg(long)]
    output: PathBuf,
    /// The policy to start from (default: the embedded one).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Inbound hook: auto picks fentry, then kprobe, then tracepoint.
    #[arg(long, value_enum, default_value = "auto")]
    attach: AttachMode,
    /// Network namespaces to watch: `self`, `all`, or an inode number.
    #[arg(long, default_value = "self")]
    netns: NetnsScope,
    #[command(flatten)]
    kubernetes: KubernetesArgs,
}

/// Where peer identities come from.
#[derive(clap::Args)]
struct KubernetesArgs {
    /// Kubeconfig file for the Kubernetes API (default: the in-cluster service account,
    /// else $KUBECONFIG or ~/.kube/config when one exists, else no API).
    #[arg(long, conflicts_with = "no_kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Do not use the Kubernetes API: judge peers by the policy's addresses only.
    #[arg(long)]
    no_kubernetes: bool,
}

impl KubernetesArgs {
    fn mode(&self) -> ApiMode {
        match (&self.kubeconfig, self.no_kubernetes) {
            (_, true) => ApiMode::Off,
            (Some(path), false) => ApiMode::Kubeconfig(path.clone()),
            (None, false) => ApiMode::Auto,
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Policy file (YAML); without it, the embedded default policy. Re-read when it
    /// changes and on SIGHUP.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Distribution profile: kubeadm, eks, gke, aks, k3s, or `auto` (from the local Node's
    /// labels and providerID through the Kubernetes API; kubeadm without one). Without
    /// --policy the profile's policy runs; with it, the file is layered on the profile
    /// as if it said `extends: NAME`.
    #[arg(long)]
    profile: Option<ProfileChoice>,
    /// Inbound hook: auto picks fentry, then kprobe, then tracepoint.
    #[arg(long, value_enum, default_value = "auto")]
    attach: AttachMode,
    /// TCP state-change hook: auto picks tp-btf, then the classic tracepoint.
    #[arg(long, value_enum, default_value = "auto")]
    state_hook: StateHook,
    /// SYN hook (half-open probes, refused attempts): `sk-lookup` on the watched
    /// namespace (the node's under `--netns all`), or `off`.
    #[arg(long, value_enum, default_value = "sk-lookup")]
    syn_hook: SynHook,
    /// Network namespaces to watch: `self` (this process's), `all`, or an inode number.
    #[arg(long, default_value = "self")]
    netns: NetnsScope,
    /// Address for /metrics, /healthz and /readyz, or `off`.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR, value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// Where alerts go: `-` for stdout, or a file (rotated by size).
    #[arg(long, default_value = "-")]
    output: String,
    /// Schema of the records: `ecs` (Elastic Common Schema) or `ocsf` (Open
    /// Cybersecurity Schema Framework 1.8.0, translated from the ECS record), on stdout
    /// and in the file alike.
    #[arg(long, value_enum, default_value = "ecs")]
    format: Format,
    /// Rotate the alert file before it passes this many bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_BYTES)]
    output_max_bytes: u64,
    /// Rotated alert files to keep.
    #[arg(long, default_value_t = DEFAULT_KEEP)]
    output_keep: usize,
    /// Permission bits of the alert files, in octal (set whenever a file is opened).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    output_mode: u32,
    /// Also write expected connections, as `event.kind: event` records.
    #[arg(long)]
    log_allowed: bool,
    /// Ring-buffer size in bytes (a power of two, at least 4096).
    #[arg(long, default_value_t = 1 << 22)]
    ring_bytes: u32,
    /// `host.hostname` in alerts (default: $NODE_NAME, else the kernel's hostname).
    /// Also the node whose pods own local containers.
    #[arg(long)]
    hostname: Option<String>,
    /// The `kubernetes` Service's ClusterIP(s), comma-separated: under `--netns all`, a
    /// pod's outbound connection there is a control-plane event. Default:
    /// $KUBERNETES_SERVICE_HOST (the kubelet sets it in every pod to that address).
    #[arg(long, value_delimiter = ',')]
    kubernetes_service: Vec<std::net::IpAddr>,
    /// At start, how long records wait for the Kubernetes feeds the policy's selectors
    /// need to sync before they are judged by address (peers then say
    /// `kubernetes.identity: unsynced`); `/readyz` answers 503 meanwhile.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    kubernetes_sync_wait: Duration,
    /// The host's root directory, where the policy's executables are looked up (opened
    /// before the capability drop). Default: /proc/1/root, the host's under hostPID; a
    /// read-only hostPath mount of / works too.
    #[arg(long, default_value = "/proc/1/root")]
    host_root: std::path::PathBuf,
    #[command(flatten)]
    kubernetes: KubernetesArgs,
}

#[derive(Clone, Copy)]
struct MetricsAddr(Option<SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|_| format!("`{s}` is not an address:port (e.g. 127.0.0.1:9477) or `off`"))
}

#[derive(clap::Args)]
struct CaptureArgs {
    /// Inbound hook: auto picks fentry, then kprobe, then tracepoint.
    #[arg(long, value_enum, default_value = "auto")]
    attach: AttachMode,
    /// TCP state-change hook: auto picks tp-btf, then the classic tracepoint.
    #[arg(long, value_enum, default_value = "auto")]
    state_hook: StateHook,
    /// SYN hook: `sk-lookup` or `off`.
    #[arg(long, value_enum, default_value = "sk-lookup")]
    syn_hook: SynHook,
    /// Ports to watch, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ports: Vec<u16>,
    /// Network namespaces to watch: `self`, `all`, or an inode number.
    #[arg(long, default_value = "self")]
    netns: NetnsScope,
    /// In-kernel dedup window (e.g. 10s, 500ms); 0 disables folding.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    window: Duration,
    /// Stop after this many records.
    #[arg(long)]
    max_records: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Ring-buffer size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    ring_bytes: u32,
    /// Print the kernel counters as a final JSON line.
    #[arg(long)]
    counters: bool,
}

/// An octal file mode: `600`, `0640`, `0o640`.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("`{s}` is not an octal file mode (e.g. 600 or 0640)"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration `{s}`"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "invalid duration unit in `{s}` (use ms, s, m or h)"
        )),
    }
}

fn main() -> ExitCode {
    set_mmap_threshold();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging();
    // `run` does its privileged start-up before the runtime starts any thread, so that the
    // capability drop covers every thread the daemon will ever have.
    let (command, prepared) = match cli.command {
        Command::Run(args) => match prepare_run(args) {
            Ok(p) => (None, Some(p)),
            Err(e) => return report(&e),
        },
        other => (Some(other), None),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("k8s-ebpf: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match (command, prepared) {
            (Some(command), _) => one_shot(command).await,
            (None, Some(p)) => p.run().await,
            (None, None) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

/// glibc raises its mmap threshold each time a large block is freed, up to 32 MiB, after
/// which the API's list pages (megabytes each, parsed and freed one after another) are
/// carved from the heap, and the identities kept between them pin those pages for good:
/// ~20 MB more resident at 150,000 pods. A fixed threshold keeps large blocks mapped
/// apart and returned when freed.
fn set_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Logs to stderr, `RUST_LOG` or `info`.
fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
                // kube-client logs every failed request at ERROR without its cause; the
                // identity watchers report the same failure once, with the cause and fix.
                .add_directive(
                    "kube_client::client::builder=off"
                        .parse()
                        .expect("valid directive"),
                )
                .add_directive(
                    "kube_runtime::watcher=error"
                        .parse()
                        .expect("valid directive"),
                ),
        )
        .init();
}

/// Every command but `run` (prepared before the runtime started).
async fn one_shot(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(_) => unreachable!("prepared above"),
        Command::CheckConfig { file, profile } => check_config(&file, profile.as_deref()),
        Command::Profiles { name } => show_profiles(name.as_deref()),
        Command::Ports { json } => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&k8s_ebpf::ports::to_json())?
                );
            } else {
                print!("{}", k8s_ebpf::ports::render_table());
            }
            Ok(())
        }
        Command::Exposure {
            json,
            probe,
            policy,
            hostname,
            kubernetes,
        } => {
            let mode = kubernetes.mode();
            exposure(json, probe, policy.as_deref(), (&mode, &hostname)).await
        }
        Command::Learn(args) => learn(args).await,
        Command::Capture(args) => capture(args).await,
        Command::Firewall(args) => write_firewall(args).await,
    }
}

/// Prints the error chain; usage errors exit 64, the rest 1.
fn report(e: &anyhow::Error) -> ExitCode {
    eprintln!("k8s-ebpf: {e:#}");
    let usage = e
        .downcast_ref::<CaptureError>()
        .is_some_and(CaptureError::is_usage)
        || e.downcast_ref::<UsageError>().is_some();
    ExitCode::from(if usage { EXIT_USAGE } else { 1 })
}

fn prepare_run(args: RunArgs) -> anyhow::Result<daemon::Prepared> {
    let output = if args.output == "-" {
        Destination::Stdout
    } else {
        Destination::File(Rotation {
            path: args.output.into(),
            max_bytes: args.output_max_bytes,
            keep: args.output_keep,
            mode: args.output_mode,
        })
    };
    daemon::prepare(DaemonConfig {
        policy_path: args.policy,
        profile: args.profile,
        attach: args.attach,
        state_hook: args.state_hook,
        syn_hook: args.syn_hook,
        netns: args.netns,
        metrics_addr: args.metrics_addr.0,
        output,
        format: args.format,
        log_allowed: args.log_allowed,
        ring_bytes: args.ring_bytes,
        hostname: args.hostname.unwrap_or_else(daemon::default_hostname),
        kubernetes_service: if args.kubernetes_service.is_empty() {
            daemon::default_kubernetes_service()
        } else {
            args.kubernetes_service
        },
        kubernetes: args.kubernetes.mode(),
        sync_wait: args.kubernetes_sync_wait,
        host_root: args.host_root,
    })
}

fn check_config(file: &std::path::Path, profile: Option<&str>) -> anyhow::Result<()> {
    let base: Option<Profile> = profile
        .map(|name| name.parse().map_err(UsageError))
        .transpose()?;
    match Policy::read_file_on(file, base) {
        Ok(policy) => {
            let ports: Vec<String> = policy.watched_ports().iter().map(u16::to_string).collect();
            let profile = policy
                .profile()
                .map(|p| format!("profile {p}; "))
                .unwrap_or_default();
            println!(
                "{}: ok ({profile}{} rules; watched ports {})",
                file.display(),
                policy.rules().count(),
                ports.join(", ")
            );
            Ok(())
        }
        Err(errors) => {
            eprintln!("{errors}");
            Err(UsageError(format!("{}: invalid policy", file.display())).into())
        }
    }
}

/// `k8s-ebpf profiles [NAME]`.
fn show_profiles(name: Option<&str>) -> anyhow::Result<()> {
    let Some(name) = name else {
        for p in Profile::ALL {
            let shipped = p.shipped_exposures();
            let alerts = if shipped.is_empty() {
                String::new()
            } else {
                let ports: Vec<String> = shipped.iter().map(u16::to_string).collect();
                format!(" [alerts as shipped: {}]", ports.join(", "))
            };
            println!("{:<8} {}{alerts}", p.name(), p.summary());
        }
        return Ok(());
    };
    let profile: Profile = name.parse().map_err(UsageError)?;
    print!("{}", profile.yaml());
    Ok(())
}

async fn exposure(
    json: bool,
    probe: bool,
    policy: Option<&std::path::Path>,
    (mode, node_name): (&ApiMode, &str),
) -> anyhow::Result<()> {
    let policy =
        daemon::load_policy(policy).map_err(|e| UsageError(format!("invalid policy:\n{e}")))?;
    let mut report = k8s_ebpf::inventory::exposure_report(&policy.watched_ports(), probe)
        .await
        .context("listing TCP listeners (netlink sock_diag)")?;
    let node = daemon::node_addresses();
    match k8s_ebpf::inventory::forwards::scan(
        |port| policy.rule(port).map(|r| r.name.clone()),
        |ip| node.contains(&ip),
    ) {
        Ok(forwards) => report.forwards = forwards,
        Err(e) => report.forwards_error = Some(e.to_string()),
    }
    match published_forwards(mode, node_name, &policy, &node).await {
        Ok(published) => {
            let seen = std::mem::take(&mut report.forwards);
            report.forwards = k8s_ebpf::inventory::forwards::merge(seen, published);
        }
        Err(e) => report.published_error = Some(e),
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", k8s_ebpf::inventory::render_text(&report));
    }
    Ok(())
}

async fn learn(args: LearnArgs) -> anyhow::Result<()> {
    let base = daemon::load_policy(args.policy.as_deref())
        .map_err(|e| UsageError(format!("invalid policy:\n{e}")))?;
    let ports = base.watched_ports();
    let config = CaptureConfig {
        attach: args.attach,
        netns: args.netns,
        window: base.window(),
        pod_scope: base.pod_scoped_ports(),
        ..CaptureConfig::default()
    };
    let mode = args.kubernetes.mode();
    let api = identity::load(&mode).map_err(UsageError)?;
    let (_capture, streams) = Capture::load(&config, &ports)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let identities = Identities::new(daemon::default_hostname());
    let metrics = Arc::new(k8s_ebpf::metrics::Metrics::new());
    let watchers = identity::start(&api, &identities, &metrics, stop_rx.clone()).await;
    if identities.is_enabled() {
        // Peers seen before the first sync would be learned as addresses.
        let synced = tokio::time::timeout(Duration::from_secs(30), async {
            while !identities.all_synced() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if synced.is_err() {
            tracing::warn!("Kubernetes identities not synced after 30 s: unknown peers are learned as addresses");
        }
    }
    let mut learned = k8s_ebpf::learn::Learned::default();
    // What is already there: listeners and established connections.
    for l in k8s_ebpf::inventory::scan_listeners(&ports).context("listing listeners")? {
        learned.observe(&base, &l.to_observation(), None);
    }
    for o in k8s_ebpf::inventory::established(&ports).context("listing connections")? {
        learned.observe(&base, &o, identities.peer_of(&o).as_ref());
    }
    tracing::info!(duration = ?args.duration, ports = ?ports, "learning");
    let reader = Reader::new(streams, Arc::new(ReaderStats::default())).context("ring buffer")?;
    let (tx, mut rx) = mpsc::channel(4096);
    let reader = tokio::spawn(reader.run(tx, stop_rx));
    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            o = rx.recv() => match o {
                Some(o) => learned.observe(&base, &o, identities.peer_of(&o).as_ref()),
                None => break,
            },
            () = &mut deadline => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    let _ = stop_tx.send(true);
    while let Some(o) = rx.recv().await {
        learned.observe(&base, &o, identities.peer_of(&o).as_ref());
    }
    reader
        .await
        .context("reader task")?
        .context("reading the ring buffer")?;
    for w in watchers {
        let _ = w.await;
    }
    let yaml = learned.to_policy_yaml(&base)?;
    std::fs::write(&args.output, yaml)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "k8s-ebpf: wrote {} ({} observations already expected, {} learned)",
        args.output.display(),
        learned.expected,
        learned.learned
    );
    Ok(())
}

/// `k8s-ebpf firewall`: the policy's expected peers as host firewall policy. Selectors
/// need the API's answer now; without it (unreachable, or none configured) nothing is
/// written and the command fails, rather than write sets missing those peers.
async fn write_firewall(args: FirewallArgs) -> anyhow::Result<()> {
    let base = match args.profile {
        None => None,
        Some(ProfileChoice::Named(p)) => Some(p),
        Some(ProfileChoice::Auto) => {
            return Err(UsageError(
                "firewall: --profile auto is not supported: name the profile (`k8s-ebpf \
                 profiles` lists them)"
                    .into(),
            )
            .into())
        }
    };
    let policy = daemon::load_policy_on(args.policy.as_deref(), base)
        .map_err(|e| UsageError(format!("invalid policy:\n{e}")))?;
    let mode = args.kubernetes.mode();
    let cluster = if mode != ApiMode::Off && firewall::needs_api(&policy, args.format) {
        Some(resolve_selectors(&mode, &policy).await?)
    } else {
        None
    };
    let resolved = firewall::resolve(&policy, cluster.as_ref());
    let options = firewall::Options {
        format: args.format,
        mode: args.mode,
        log_group: args.log_group,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        generated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let text = firewall::render(&resolved, &policy, &options);
    for w in firewall::warnings(&resolved, args.format) {
        eprintln!("k8s-ebpf firewall: not expressed: {w}");
    }
    match &args.output {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// The forwards of this node's watched ports the API's objects publish (hostPorts,
/// externalIPs, NodePorts), or why they could not be read.
#[cfg(feature = "kubernetes")]
async fn published_forwards(
    mode: &ApiMode,
    node_name: &str,
    policy: &Policy,
    node: &std::collections::HashSet<std::net::IpAddr>,
) -> Result<Vec<k8s_ebpf::inventory::forwards::Forward>, String> {
    if matches!(mode, ApiMode::Off) {
        return Err("--no-kubernetes".to_owned());
    }
    let api = identity::load(mode)?;
    let published = identity::published(&api, node_name).await?;
    Ok(identity::published_forwards(
        &published.pods,
        &published.services,
        |port| policy.rule(port).map(|r| r.name.clone()),
        // Other hosts' addresses are not read here: interception is the daemon's.
        (|ip| node.contains(&ip), |_| None),
    ))
}

#[cfg(not(feature = "kubernetes"))]
async fn published_forwards(
    _: &ApiMode,
    _: &str,
    _: &Policy,
    _: &std::collections::HashSet<std::net::IpAddr>,
) -> Result<Vec<k8s_ebpf::inventory::forwards::Forward>, String> {
    Err("this build has no Kubernetes support".to_owned())
}

/// One read of the API for the policy's selectors.
#[cfg(feature = "kubernetes")]
async fn resolve_selectors(
    mode: &ApiMode,
    policy: &Policy,
) -> anyhow::Result<identity::ClusterSnapshot> {
    let api = identity::load(mode).map_err(UsageError)?;
    let keys = identity::LabelKeys::for_selectors(policy.pod_label_keys());
    identity::snapshot(&api, &policy.pod_queries(), keys)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "the policy's Kubernetes selectors need their addresses from the API, and: {e}; \
                 nothing written (--no-kubernetes writes the rules without them, each named)"
            )
        })
}

#[cfg(not(feature = "kubernetes"))]
async fn resolve_selectors(_: &ApiMode, _: &Policy) -> anyhow::Result<identity::ClusterSnapshot> {
    anyhow::bail!("this build has no Kubernetes support: run with --no-kubernetes")
}

async fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    let config = CaptureConfig {
        attach: args.attach,
        netns: args.netns,
        window: args.window,
        ring_bytes: args.ring_bytes,
        state_hook: args.state_hook,
        syn_hook: args.syn_hook,
        // A raw view: every namespace's listeners and connections, pods' included.
        pod_scope: args.ports.iter().copied().collect(),
    };
    let ports: BTreeSet<u16> = args.ports.into_iter().collect();
    let (capture, streams) = Capture::load(&config, &ports)?;
    println!(
        "{}",
        serde_json::json!({"status": "attached", "inbound": capture.inbound().as_str(),
            "state": capture.state_hook(),
            "syn": capture.captures_syns(), "netns": capture.netns()})
    );
    let stats = Arc::new(ReaderStats::default());
    let reader = Reader::new(streams, stats.clone()).context("ring buffer")?;
    let (tx, mut rx) = mpsc::channel(1024);
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = tokio::spawn(reader.run(tx, stop_rx));
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut printed = 0u64;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            o = rx.recv() => {
                let Some(o) = o else { break };
                println!("{}", o.to_json());
                printed += 1;
                if args.max_records.is_some_and(|m| printed >= m) { break; }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Stop the reader and print what it still delivers: the last records and the counts of
    // dedup windows still open.
    let _ = stop_tx.send(true);
    while let Some(o) = rx.recv().await {
        println!("{}", o.to_json());
    }
    reader
        .await
        .context("reader task")?
        .context("reading the ring buffer")?;
    if args.counters {
        let counters = capture.counters()?;
        let mut obj = serde_json::Map::new();
        for (name, value) in counters.named() {
            obj.insert(name.to_owned(), value.into());
        }
        obj.insert(
            "decode_errors".into(),
            stats
                .decode_errors
                .load(std::sync::atomic::Ordering::Relaxed)
                .into(),
        );
        println!("{}", serde_json::json!({ "counters": obj }));
    }
    Ok(())
}

//! The `portcullis` command line. Everything else lives in the library.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;

use portcullis::config::{self, Loaded};
use portcullis::policy::{self, target, Action};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Egress proxy that blocks, limits and audits AI services"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default); without --config, serves config/portcullis.toml.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration: exit 0 with a summary, exit 2 with FILE:LINE:COL: message.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the decision for one request as JSON. URL may be host:port for a CONNECT.
    Explain {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        client: IpAddr,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        method: Option<String>,
        /// The request body's `model`, for model-aware rules.
        #[arg(long)]
        model: Option<String>,
        url: String,
    },
    /// The interception CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create ca.pem and ca.key (mode 0600) in DIR.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "portcullis interception CA")]
        name: String,
    },
}

/// mimalloc's per-thread free lists: the request path allocates and frees small buffers on
/// every exchange, and glibc malloc was 5% of the proxy's CPU under the peers benchmark.
/// Built without transparent huge pages (`no_thp`): on hosts with THP "always" its arena
/// would otherwise hold ~7 MiB more at idle.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config } => run(config.as_deref()),
        Command::Check { config } => check(&config),
        Command::Explain {
            config,
            client,
            user,
            method,
            model,
            url,
        } => explain(
            &config,
            client,
            user.as_deref(),
            method.as_deref(),
            model.as_deref(),
            &url,
        ),
        Command::Ca {
            command: CaCommand::Init { out, name },
        } => match portcullis::ca::init(&out, &name) {
            Ok(()) => {
                println!("wrote {0}/ca.pem and {0}/ca.key (mode 0600)", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("portcullis: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn load(path: Option<&Path>) -> Result<Loaded, ExitCode> {
    let loaded = match path {
        Some(p) => config::load(p),
        None => config::load_default(),
    };
    loaded.map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// Every client connection and tunnel holds one or two descriptors: take the hard limit
/// rather than the (often 1024) soft one, as nginx and squid do.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let soft = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(soft, "cannot raise the open-files limit");
            }
        }
    }
}

/// The most some dependencies may log, whatever the level asked for (a cap, not a level:
/// under `warn` they stay at `warn`).
fn log_caps() -> tracing_subscriber::filter::Targets {
    use tracing::Level;
    tracing_subscriber::filter::Targets::new()
        .with_default(Level::TRACE)
        // The file watcher traces every inotify event; with the log written to a file in a
        // watched directory each line would be an event, and so on without end, starving the
        // request threads of the log's lock.
        .with_target("notify", Level::INFO)
        // At debug, h2 writes out the pseudo-headers of a request it refuses (a key in a
        // `:path` with a space, a password in an `:authority`), and hyper-util the requests it
        // sends; rustls's trace holds whole handshake messages. Secrets reach no log at any
        // level.
        .with_target("h2", Level::INFO)
        .with_target("hyper_util", Level::INFO)
        .with_target("rustls", Level::DEBUG)
}

fn run(path: Option<&Path>) -> ExitCode {
    let loaded = match load(path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    // Process logs go to stderr (the audit log may be stdout); RUST_LOG wins over [log] level.
    use tracing_subscriber::prelude::*;
    let level = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&loaded.settings.log_level));
    tracing_subscriber::registry()
        .with(level)
        .with(log_caps())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    raise_open_files_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async {
        // Handlers first: a signal that lands while listeners start must still drain cleanly.
        let signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("portcullis: cannot install signal handlers: {e}");
                return ExitCode::from(1);
            }
        };
        let running = match portcullis::app::start(loaded).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("portcullis: {e}");
                return ExitCode::from(1);
            }
        };
        signals.serve(&running).await;
        tracing::info!("shutting down");
        let audit = running.state.audit.clone();
        running.shutdown().await;
        // A supervisor (systemd, Kubernetes) sees a loss of records only in the exit status.
        match audit.lost() {
            0 => {
                tracing::info!("stopped; audit log flushed");
                ExitCode::SUCCESS
            }
            n => {
                tracing::error!("stopped; {n} audit records lost (the audit sink still failed)");
                ExitCode::from(1)
            }
        }
    })
}

/// SIGHUP reloads the policy, SIGUSR1 reopens the audit file (logrotate), SIGTERM/SIGINT stop.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }

    /// Handles reload and reopen until asked to stop.
    async fn serve(mut self, running: &portcullis::app::Running) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => {
                    let _ = portcullis::reload::reload(&running.state).await;
                }
                _ = self.usr1.recv() => {
                    tracing::info!("reopening the audit log");
                    running.state.audit.reopen();
                }
            }
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match load(Some(path)) {
        Ok(l) => {
            if let Err(e) = portcullis::app::check_files(&l.settings) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::from(2);
            }
            let p = &l.policy;
            println!(
                "{}: ok: {} vendors, {} hosts, {} rules, default {}; proxy {}",
                path.display(),
                p.catalog.vendors().len(),
                p.catalog.host_count(),
                p.rules.len(),
                p.default.action.as_str(),
                l.settings.proxy.listen
            );
            // Notes, not errors: on stderr, so the summary stays one line.
            for note in p.blind_rules() {
                eprintln!("{}: note: {note}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn explain(
    path: &Path,
    client: IpAddr,
    user: Option<&str>,
    method: Option<&str>,
    model: Option<&str>,
    url: &str,
) -> ExitCode {
    let model_lower = model.map(str::to_ascii_lowercase);
    let loaded = match load(Some(path)) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let p = &loaded.policy;
    // "host:port" (no scheme) is a CONNECT; anything else must be an absolute URL.
    let connect = !url.contains("://");
    let parsed = if connect {
        target::from_connect_authority(url).map(|(h, port)| (h, port, None, "https"))
    } else {
        url.parse::<http::Uri>()
            .map_err(|_| target::TargetError::NotAbsolute)
            .and_then(|u| {
                let t = target::from_uri(&u)?;
                let pq = u.path_and_query().map_or("/", |p| p.as_str()).to_string();
                Ok((t.host, t.port, Some(pq), t.scheme.as_str()))
            })
    };
    let (host, port, path_q, scheme) = match parsed {
        Ok(x) => x,
        Err(e) => {
            eprintln!("portcullis: {url}: {e}");
            return ExitCode::from(2);
        }
    };
    let default_method = if connect { "CONNECT" } else { "GET" };
    let method = match http::Method::from_bytes(
        method
            .unwrap_or(default_method)
            .to_ascii_uppercase()
            .as_bytes(),
    ) {
        Ok(m) => m,
        Err(_) => {
            eprintln!("portcullis: invalid method");
            return ExitCode::from(2);
        }
    };
    let d = p.decide(&policy::Request {
        client,
        user,
        method: &method,
        host: &host,
        port,
        path: path_q.as_deref(),
        body: policy::BodyFacts {
            model: model_lower.as_deref(),
            dlp: 0,
        },
    });
    let intercepted = connect
        && p.intercept
            .intercepts(&host, p.catalog.lookup(&host).map(|h| h.vendor));
    let port_refused = connect && !p.connect_ports.contains(&port);
    let (action, reason) = if port_refused {
        (Action::Block.as_str(), "port_not_allowed".to_string())
    } else {
        (d.action.as_str(), d.reason.to_string())
    };
    let out = json!({
        "method": method.as_str(),
        "scheme": scheme,
        "host": host.to_string(),
        "port": port,
        "path": path_q,
        "vendor": d.vendor_id().map(|v| &**v),
        "endpoint": d.endpoint.as_str(),
        "rule": if port_refused { None } else { d.rule_id().map(|r| &**r) },
        "action": action,
        "mode": d.mode.as_str(),
        "enforced": if port_refused { "block" } else { d.enforced().as_str() },
        "reason": reason,
        // The model the path names is the one rules read, whatever `--model` says.
        "model": path_q.as_deref().and_then(|q| p.path_model(&host, q)).or(model_lower),
        "intercept": if connect { Some(intercepted) } else { None },
        "limits": d.rule.filter(|_| d.action == Action::Limit).map(|r| {
            r.limits.iter().map(|l| json!({
                "id": &*l.id,
                "kind": format!("{:?}", l.kind),
                "by": l.by.iter().map(|b| format!("{b:?}").to_lowercase()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()
        }),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    ExitCode::SUCCESS
}

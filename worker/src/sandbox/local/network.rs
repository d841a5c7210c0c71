//! The network of a local sandbox whose template has `network = true`
//! (ADR 0014).
//!
//! Each such sandbox gets a network namespace of its own (`ip netns add`),
//! created by root so code in the sandbox (a user namespace of its own) can
//! never change it. The namespace's only way out is slirp4netns, a user-mode
//! TCP/IP stack on the host that makes the sandbox's connections as ordinary
//! host sockets, with `--disable-host-loopback`. Egress rules in the
//! namespace (nftables) refuse loopback, private, link-local, reserved and
//! multicast targets and every address of the host itself, unless the
//! template's `network_allow` names them. So a sandbox reaches the internet
//! and nothing of the host or its LAN: not Redis or RabbitMQ on loopback, not
//! a worker's metrics port, not a cloud metadata endpoint.
//!
//! slirp4netns watches a pipe from the worker (`--exit-fd`): when the worker
//! dies, the pipe closes and slirp4netns exits by itself; the reaper removes
//! the namespace by the name recorded in the sandbox's metadata.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// The resolver slirp4netns offers inside the namespace (it forwards to the
/// host's resolver).
pub const SANDBOX_DNS: &str = "10.0.2.3";
/// How long slirp4netns may take to bring the namespace's interface up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Serialises `ip netns add` between the workers of a host.
const LOCK_FILE: &str = "/run/shoal-netns.lock";

/// Targets no sandbox reaches unless its template allows them: IANA's
/// special-purpose blocks (loopback, private, shared, link-local, reserved,
/// documentation, benchmarking, multicast, broadcast, IPv4-mapped, ULA).
const REFUSED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("64:ff9b::/96", "NAT64"),
    ("100::/64", "discard"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

fn refused_blocks() -> impl Iterator<Item = (IpNet, &'static str)> {
    REFUSED.iter().map(|(block, kind)| {
        (
            block.parse().expect("the refused blocks are valid CIDR"),
            *kind,
        )
    })
}

/// Why a sandbox may not reach `ip` (loopback, private, ...), or `None`.
pub fn refused_kind(ip: IpAddr, allow: &[IpNet]) -> Option<&'static str> {
    if allow.iter().any(|net| net.contains(&ip)) {
        return None;
    }
    refused_blocks()
        .find(|(block, _)| block.contains(&ip))
        .map(|(_, kind)| kind)
}

/// The programs and facts network namespaces need, found once at startup.
#[derive(Debug, Clone)]
pub struct NetworkTools {
    ip: PathBuf,
    nft: PathBuf,
    slirp4netns: PathBuf,
    unshare: PathBuf,
    /// Every address of the host's own interfaces: refused to sandboxes
    /// (a worker's metrics, anything bound to 0.0.0.0).
    host_addresses: Vec<IpAddr>,
}

impl NetworkTools {
    /// Finds `ip`, `nft` and `slirp4netns`, and reads the host's addresses.
    pub fn detect() -> Result<Self, String> {
        let find = |name: &str, package: &str| {
            find_program(name).ok_or_else(|| {
                format!(
                    "{name} not found on PATH or in /usr/sbin, /sbin (Debian package {package})"
                )
            })
        };
        Ok(Self {
            ip: find("ip", "iproute2")?,
            nft: find("nft", "nftables")?,
            slirp4netns: find("slirp4netns", "slirp4netns")?,
            unshare: find("unshare", "util-linux")?,
            host_addresses: host_addresses()?,
        })
    }

    /// A new namespace `name` with egress rules and slirp4netns attached.
    pub async fn create(&self, name: &str, allow: &[IpNet]) -> Result<SandboxNet, String> {
        self.add_namespace(name).await?;
        match self.configure(name, allow).await {
            Ok(slirp) => Ok(SandboxNet { slirp: Some(slirp) }),
            Err(error) => {
                let _ = self.remove(name).await;
                Err(error)
            }
        }
    }

    /// `ip netns add`, one at a time on the host: concurrent first adds each
    /// bind-mount `/run/netns` onto itself and hide each other's namespaces
    /// (seen here with parallel tests), so every add takes a host-wide lock.
    async fn add_namespace(&self, name: &str) -> Result<(), String> {
        let ip = self.ip.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(LOCK_FILE)
                .map_err(|e| format!("{LOCK_FILE}: {e}"))?;
            let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| format!("locking {LOCK_FILE}: {e}"))?;
            let output = std::process::Command::new(&ip)
                .args(["netns", "add", &name])
                .output()
                .map_err(|e| format!("cannot run {}: {e}", ip.display()))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip netns add {name} failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        })
        .await
        .map_err(|e| format!("ip netns add: {e}"))?
    }

    async fn configure(&self, name: &str, allow: &[IpNet]) -> Result<Child, String> {
        let rules = self.ruleset(allow);
        let mut nft = Command::new(&self.ip);
        nft.args(["netns", "exec", name])
            .arg(&self.nft)
            .args(["-f", "-"]);
        run_with_input(&mut nft, rules.as_bytes())
            .await
            .map_err(|e| format!("egress rules: {e}"))?;
        // slirp4netns faces the sandbox's traffic, so it confines itself
        // (`--enable-sandbox`: its own mount namespace, capabilities dropped;
        // seccomp). It starts in a private mount namespace first: its own
        // unmounts would otherwise propagate to the host's shared
        // `/run/netns` and take every sandbox's namespace with them.
        let mut slirp = Command::new(&self.unshare)
            .args(["--mount", "--propagation", "private"])
            .arg(&self.slirp4netns)
            .args([
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                "--enable-sandbox",
                "--enable-seccomp",
                "--netns-type=path",
                // Ready is written to stdout; stdin closing (the worker died) ends it.
                "--ready-fd=1",
                "--exit-fd=0",
            ])
            .arg(netns_path(name))
            .arg("tap0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start slirp4netns: {e}"))?;
        // It writes `1` to the ready fd (stdout) once the interface is up;
        // warnings before it go to the same stream.
        let stdout = slirp.stdout.as_mut().expect("stdout is piped");
        let started = tokio::time::timeout(READY_TIMEOUT, async {
            let mut byte = [0u8; 1];
            loop {
                match stdout.read(&mut byte).await {
                    Ok(1) if byte[0] == b'1' => return true,
                    Ok(1) => continue,
                    _ => return false,
                }
            }
        })
        .await;
        if started != Ok(true) {
            let _ = slirp.start_kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = slirp.stderr.take() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), pipe.read_to_string(&mut stderr))
                        .await;
            }
            let _ = slirp.wait().await;
            return Err(format!(
                "slirp4netns did not bring the sandbox network up: {}",
                stderr.trim()
            ));
        }
        if let Some(pipe) = slirp.stderr.take() {
            // Drain its log so a full pipe never stalls it.
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(%line, "slirp4netns");
                }
            });
        }
        Ok(slirp)
    }

    /// Deletes namespace `name`; one that does not exist is fine.
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        if !netns_path(name).exists() {
            return Ok(());
        }
        run(Command::new(&self.ip).args(["netns", "delete", name])).await
    }

    /// The namespace's nftables rules: DNS to slirp4netns and the template's
    /// allowed blocks first, then every refused block and host address.
    fn ruleset(&self, allow: &[IpNet]) -> String {
        let family = |net: &IpNet| match net {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        let mut rules = String::from(
            "table inet shoal {\n  chain output {\n    type filter hook output priority 0; policy accept;\n    oif \"lo\" accept\n",
        );
        for proto in ["udp", "tcp"] {
            let _ = writeln!(rules, "    ip daddr {SANDBOX_DNS} {proto} dport 53 accept");
        }
        for net in allow {
            let _ = writeln!(rules, "    {} daddr {net} accept", family(net));
        }
        for (net, _) in refused_blocks() {
            let _ = writeln!(rules, "    {} daddr {net} reject", family(&net));
        }
        for address in &self.host_addresses {
            if refused_kind(*address, &[]).is_none() {
                let net = IpNet::from(*address);
                let _ = writeln!(rules, "    {} daddr {net} reject", family(&net));
            }
        }
        rules.push_str("  }\n}\n");
        rules
    }
}

/// A sandbox's live network: slirp4netns, stopped when this is dropped or
/// [`SandboxNet::stop`]ped.
pub struct SandboxNet {
    slirp: Option<Child>,
}

impl SandboxNet {
    /// Stops slirp4netns and waits for it.
    pub async fn stop(mut self) {
        if let Some(mut slirp) = self.slirp.take() {
            let _ = slirp.kill().await;
        }
    }
}

/// The namespace name of sandbox `id`.
pub fn netns_name(id: &str) -> String {
    format!("shoal-{id}")
}

/// Where `ip netns` mounts namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// What a sandbox in a namespace uses as `/etc/resolv.conf`.
pub fn resolv_conf() -> String {
    format!("nameserver {SANDBOX_DNS}\noptions edns0\n")
}

/// Checks a repository URL before anything is fetched for a task: only
/// http(s) and git, and no literal address or local name the sandbox may not
/// reach. Names that resolve to refused addresses are stopped by the egress
/// rules when the connection is made.
pub fn check_fetch_url(raw: &str, allow: &[IpNet]) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| format!("repo.url {raw:?} is not a URL: {e}"))?;
    match url.scheme() {
        "https" | "http" | "git" => {}
        other => {
            return Err(format!(
                "repo.url scheme {other:?} is not allowed: use https, http or git"
            ))
        }
    }
    let ip = match url.host() {
        None => return Err(format!("repo.url {raw:?} has no host")),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost" || name.ends_with(".localhost") {
                return Err(format!(
                    "repo.url host {name:?} is the sandbox host's loopback"
                ));
            }
            return Ok(());
        }
    };
    match refused_kind(ip, allow) {
        None => Ok(()),
        Some(kind) => Err(format!(
            "repo.url host {ip} is a {kind} address, which the template's network_allow does not name"
        )),
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn host_addresses() -> Result<Vec<IpAddr>, String> {
    let interfaces =
        nix::ifaddrs::getifaddrs().map_err(|e| format!("reading the host's addresses: {e}"))?;
    let mut addresses: Vec<IpAddr> = interfaces
        .filter_map(|interface| interface.address)
        .filter_map(|address| {
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

async fn run(command: &mut Command) -> Result<(), String> {
    run_with_input(command, &[]).await
}

async fn run_with_input(command: &mut Command, input: &[u8]) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", command.as_std().get_program()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .await
            .map_err(|e| format!("writing to {:?}: {e}", command.as_std().get_program()))?;
    }
    let output = tokio::time::timeout(READY_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{:?} did not finish", command.as_std().get_program()))?
        .map_err(|e| format!("{:?}: {e}", command.as_std().get_program()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} {:?} failed ({}): {}",
            command.as_std().get_program(),
            command.as_std().get_args().collect::<Vec<_>>(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_private_and_link_local_targets_are_refused_unless_allowed() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "192.168.1.1",
            "::1",
            "fd00::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(refused_kind(ip, &[]).is_some(), "{ip}");
        }
        let allow: Vec<IpNet> = vec!["10.1.0.0/16".parse().unwrap()];
        assert_eq!(refused_kind("10.1.2.3".parse().unwrap(), &allow), None);
        assert_eq!(refused_kind("93.184.215.14".parse().unwrap(), &[]), None);
    }

    #[test]
    fn fetch_urls_are_checked_before_anything_runs() {
        let refused = |url: &str| check_fetch_url(url, &[]).unwrap_err();
        assert!(refused("http://127.0.0.1:6379/x.git").contains("loopback"));
        // Other spellings of loopback normalise to it.
        assert!(refused("http://2130706433/x.git").contains("loopback"));
        assert!(refused("http://0x7f.1/x.git").contains("loopback"));
        assert!(refused("http://[::1]:80/x.git").contains("loopback"));
        assert!(refused("http://localhost/x.git").contains("loopback"));
        assert!(refused("http://169.254.169.254/latest").contains("link-local"));
        assert!(refused("file:///etc/passwd").contains("scheme"));
        assert!(
            refused("ext::sh -c id").contains("not a URL")
                || refused("ext::sh -c id").contains("scheme")
        );
        assert!(refused("--upload-pack=id").contains("not a URL"));
        assert!(check_fetch_url("https://github.com/org/repo.git", &[]).is_ok());
        let allow: Vec<IpNet> = vec!["10.0.0.5/32".parse().unwrap()];
        assert!(check_fetch_url("http://10.0.0.5/repo.git", &allow).is_ok());
    }

    #[test]
    fn the_ruleset_allows_dns_and_the_template_and_refuses_the_host() {
        let tools = NetworkTools {
            ip: "ip".into(),
            nft: "nft".into(),
            slirp4netns: "slirp4netns".into(),
            unshare: "unshare".into(),
            host_addresses: vec![
                "127.0.0.1".parse().unwrap(),
                "93.184.215.14".parse().unwrap(),
            ],
        };
        let rules = tools.ruleset(&["10.0.0.5/32".parse().unwrap()]);
        let accept = rules.find("ip daddr 10.0.0.5/32 accept").unwrap();
        let reject = rules.find("ip daddr 10.0.0.0/8 reject").unwrap();
        assert!(accept < reject, "allowed blocks come first:\n{rules}");
        assert!(
            rules.contains("ip daddr 93.184.215.14/32 reject"),
            "{rules}"
        );
        // An address inside a refused block is not listed twice.
        assert!(!rules.contains("127.0.0.1/32"), "{rules}");
        assert!(rules.contains(&format!("ip daddr {SANDBOX_DNS} udp dport 53 accept")));
    }
}

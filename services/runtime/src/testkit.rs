//! Test support: a real etcd server (the Debian `etcd-server` binary) on free loopback ports with
//! a throw-away data directory, which can be stopped and restarted on the same ports; optionally
//! TLS-only with client certificates (made with the `openssl` command).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<TestCerts>,
}

/// A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate (PEM
/// files, ECDSA P-256).
#[derive(Clone, Debug)]
pub struct TestCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("running openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestCerts {
    pub fn generate(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=expertmesh-test-ca"];
        ca.extend_from_slice(&key);
        ca.extend_from_slice(&["-keyout", "ca.key", "-out", "ca.pem"]);
        openssl(dir, &ca);
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let ext = format!("{name}.ext");
            std::fs::write(
                dir.join(&ext),
                format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"),
            )
            .unwrap();
            let (csr, keyfile, pem) = (format!("{name}.csr"), format!("{name}.key"), format!("{name}.pem"));
            let mut req = vec!["req", "-subj", "/CN=localhost"];
            req.extend_from_slice(&key);
            req.extend_from_slice(&["-keyout", &keyfile, "-out", &csr]);
            openssl(dir, &req);
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                    "-out",
                    &pem,
                ],
            );
        }
        TestCerts {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// A port that was free a moment ago and that no other caller in this process has been given.
/// The kernel may hand a just-released port out again, and two tests starting etcd at once
/// must never share one: their clusters would register in each other's etcd.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port =
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free port");
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// The inodes of the TCP sockets listening on `port` (any address), from `/proc/net/tcp{,6}`.
fn listening_inodes(port: u16) -> BTreeSet<u64> {
    const LISTEN: &str = "0A";
    let mut out = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some(local_port) = f.get(1).and_then(|a| a.rsplit_once(':')) else { continue };
            let listening = f.get(3) == Some(&LISTEN);
            if listening && u16::from_str_radix(local_port.1, 16) == Ok(port) {
                out.extend(f.get(9).and_then(|i| i.parse::<u64>().ok()));
            }
        }
    }
    out
}

/// Whether process `pid` itself listens on `port`: one of its file descriptors is a listening
/// socket on it. A successful connect alone could reach another test's server on that port.
fn owns_listener(pid: u32, port: u16) -> bool {
    let inodes = listening_inodes(port);
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|target| {
        let target = target.to_string_lossy();
        let inode = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']'));
        inode.and_then(|i| i.parse().ok()).is_some_and(|i| inodes.contains(&i))
    })
}

fn etcd_binary() -> PathBuf {
    std::env::var_os("EXPERTMESH_TEST_ETCD").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("etcd"))
}

impl EtcdServer {
    /// Starts etcd and waits until it accepts connections. Panics with a hint when the binary is
    /// missing (`apt-get install etcd-server`, or set EXPERTMESH_TEST_ETCD).
    pub fn start() -> Self {
        Self::start_on_free_ports(None)
    }

    /// An etcd that speaks only TLS to clients and requires a client certificate signed by
    /// `certs.ca`.
    pub fn start_tls(certs: TestCerts) -> Self {
        Self::start_on_free_ports(Some(certs))
    }

    /// A port that was free when picked may be taken before etcd binds it (by any process on
    /// the machine); then etcd exits and the next attempt picks other ports.
    fn start_on_free_ports(tls: Option<TestCerts>) -> Self {
        const ATTEMPTS: usize = 5;
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let dir = std::env::temp_dir().join(format!("expertmesh-etcd-{}-{}", std::process::id(), free_port()));
            let (client_port, peer_port) = (free_port(), free_port());
            let mut s = EtcdServer { child: None, dir, client_port, peer_port, tls: tls.clone() };
            match s.launch() {
                Ok(()) => return s,
                Err(e) => failures.push(e),
            }
        }
        panic!("etcd did not start in {ATTEMPTS} attempts: {failures:?}");
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Kills the server (SIGKILL); its data stays for `restart`.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports and data directory.
    pub fn restart(&mut self) {
        if let Err(e) = self.launch() {
            panic!("restarting etcd: {e}");
        }
    }

    /// Starts etcd and waits until this very process listens on the client port.
    fn launch(&mut self) -> Result<(), String> {
        self.stop();
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_binary());
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file").arg(&t.server_cert).arg("--key-file").arg(&t.server_key);
            cmd.arg("--trusted-ca-file").arg(&t.ca).arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "test", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}"), "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd (install the etcd-server package or set EXPERTMESH_TEST_ETCD)");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !owns_listener(pid, self.client_port) {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!("etcd exited ({status}): port {} or {} taken?", self.client_port, self.peer_port));
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!("etcd did not listen on {} within 20 s", self.client_port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        // Without the record, 300 picks repeat a port a few times on Linux (measured 3–5 with
        // the default port range; the birthday bound over ~14k bind ports gives ~3).
        let ports: Vec<u16> = (0..300).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[test]
    fn a_listener_belongs_to_the_process_holding_it_and_no_other() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(owns_listener(std::process::id(), port));
        let mut other = Command::new("sleep").arg("10").spawn().unwrap();
        let others = owns_listener(other.id(), port);
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(!others, "a process that does not hold the socket");
        drop(listener);
        assert!(!owns_listener(std::process::id(), port), "a closed listener");
    }

    #[test]
    fn etcd_is_reported_up_only_when_it_listens_itself() {
        let etcd = EtcdServer::start();
        let pid = etcd.child.as_ref().unwrap().id();
        assert!(owns_listener(pid, etcd.client_port));
        // An etcd whose client port is held by someone else must not be reported up.
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = std::env::temp_dir().join(format!("expertmesh-etcd-clash-{}", std::process::id()));
        let mut clash = EtcdServer {
            child: None,
            dir,
            client_port: taken.local_addr().unwrap().port(),
            peer_port: free_port(),
            tls: None,
        };
        let err = clash.launch().unwrap_err();
        assert!(err.contains("exited"), "{err}");
    }
}

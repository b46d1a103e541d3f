//! What the system tests share: the `sdlm` binary (built once), real processes with their
//! output captured, a real etcd on loopback ports, and gRPC clients.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use sdlm_proto::v1;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The bundled model.
pub fn model_dir() -> PathBuf {
    root().join("models/sdlm-tiny-code")
}

/// The `sdlm` binary of this build profile, built once per test process (cargo does nothing
/// when it is up to date).
pub fn sdlm() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "-p",
                "sdlm",
                "--bin",
                "sdlm",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(root())
            .stderr(Stdio::inherit())
            .output()
            .expect("cargo runs");
        assert!(out.status.success(), "building sdlm failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["target"]["name"] == "sdlm" && m["executable"].is_string())
            .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
            .next_back()
            .expect("cargo names the sdlm executable")
    })
}

/// A free loopback port (bound and released; the tests' own processes take it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process killed (SIGKILL) when dropped, with its stderr in a log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    /// The lines it printed on stdout (the address lines).
    pub stdout: std::sync::mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `sdlm ARGS` and waits for its line with "gRPC on ADDR"; returns it, ADDR and the
    /// metrics address when it printed one.
    pub fn sdlm(name: &str, args: &[&str], dir: &Path) -> (Self, String, Option<String>) {
        Self::sdlm_with_env(name, args, &[], dir)
    }

    /// [`Proc::sdlm`] with extra environment variables.
    pub fn sdlm_with_env(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> (Self, String, Option<String>) {
        let log = dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(sdlm())
            .args(args)
            .envs(env.iter().copied())
            .env("SDLM_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("sdlm starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Proc {
            name: name.to_string(),
            child,
            log,
            stdout: rx,
        };
        let line = p.wait_line("gRPC on ", Duration::from_secs(120));
        let grpc = field_after(&line, "gRPC on ").expect("an address");
        let metrics = field_after(&line, "metrics on http://")
            .map(|m| m.trim_end_matches("/metrics").to_string());
        (p, grpc, metrics)
    }

    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "{} did not print {needle:?} in time; its log:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit; its status, or None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly.
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field_after(line: &str, marker: &str) -> Option<String> {
    let rest = &line[line.find(marker)? + marker.len()..];
    Some(
        rest.split([',', ' '])
            .next()
            .unwrap_or_default()
            .to_string(),
    )
}

/// `sdlm serve` of the bundled model on loopback ports chosen by the system, with `extra`
/// flags; the process, its gRPC address and its metrics address.
pub fn serve_bundled(dir: &TempDir, extra: &[&str]) -> (Proc, String, Option<String>) {
    let model = model_dir();
    let mut args = vec![
        "serve",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Proc::sdlm("serve", &args, &dir.0)
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sdlm-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ rand_tag()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

fn rand_tag() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real etcd (Debian's etcd-server, installed by scripts/install-etcd.sh) on loopback ports
/// with a temporary data directory.
pub struct Etcd {
    pub url: String,
    proc: Proc,
    _dir: TempDir,
}

impl Etcd {
    /// Kills etcd (SIGKILL): an outage.
    pub fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    pub fn start() -> Self {
        let etcd = which("etcd").unwrap_or_else(|| {
            panic!("etcd is not installed: run scripts/install-etcd.sh (Debian's etcd-server)")
        });
        // A port free when asked can be taken before etcd binds it (free_port releases it):
        // then etcd exits at once, and a fresh pair of ports is tried.
        let mut last_log = String::new();
        for _ in 0..3 {
            let dir = TempDir::new("etcd");
            match Self::try_start(&etcd, dir) {
                Ok(started) => return started,
                Err(log) => last_log = log,
            }
        }
        panic!("etcd did not listen: {last_log}")
    }

    /// etcd on two fresh ports; its log when it exits before listening.
    fn try_start(etcd: &std::path::Path, dir: TempDir) -> Result<Self, String> {
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let log = dir.0.join("etcd.log");
        let child = Command::new(etcd)
            .args([
                "--name",
                "test",
                "--data-dir",
                &dir.0.join("data").to_string_lossy(),
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("test=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("etcd log"))
            .spawn()
            .expect("etcd starts");
        let (_tx, rx) = std::sync::mpsc::channel();
        let mut proc = Proc {
            name: "etcd".into(),
            child,
            log,
            stdout: rx,
        };
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            let exited = matches!(proc.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() >= end {
                return Err(proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            url,
            proc,
            _dir: dir,
        })
    }
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A gRPC client of the public API at `addr`.
pub async fn client(
    addr: &str,
) -> v1::generation_client::GenerationClient<tonic::transport::Channel> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match v1::generation_client::GenerationClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > end => panic!("no gateway at {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Greedy parameters with `max_new_tokens`.
pub fn greedy(max_new_tokens: u32) -> v1::DecodingParams {
    v1::DecodingParams {
        max_new_tokens: Some(max_new_tokens),
        ..Default::default()
    }
}

/// Reads a whole stream: the concatenated text, the number of messages, the last message.
pub async fn read_stream(
    mut stream: tonic::Streaming<v1::GenerateStreamResponse>,
) -> Result<(String, usize, v1::GenerateStreamResponse), tonic::Status> {
    let mut text = String::new();
    let mut n = 0;
    let mut last = None;
    while let Some(m) = stream.message().await? {
        text.push_str(&m.text);
        n += 1;
        last = Some(m);
    }
    let last = last.ok_or_else(|| tonic::Status::internal("empty stream"))?;
    Ok((text, n, last))
}

/// `sdlm generate --json` of the bundled model: the text.
pub fn generate_cli(prompt: &str, max_new_tokens: u32) -> String {
    let out = Command::new(sdlm())
        .args([
            "generate",
            "--json",
            "--max-new-tokens",
            &max_new_tokens.to_string(),
            "--model",
        ])
        .arg(model_dir())
        .arg(prompt)
        .output()
        .expect("sdlm generate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).expect("json line");
    v["text"].as_str().unwrap_or_default().to_string()
}

/// The body of `http://ADDR/metrics`.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

/// The value of a metric line `name{labels} value` or `name value` (first match), if any.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with([' ', '{'])
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One system test at a time per test binary: they start several processes each, and on two
/// cores parallel ones would starve each other's timing (failure detection, elections).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

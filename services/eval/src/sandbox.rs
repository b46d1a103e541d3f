//! Runs an untrusted Python program (a model's completion plus a problem's tests) in a process
//! of its own, and says whether it passed.
//!
//! Each run gets: a fresh temporary directory as its working directory (removed afterwards); an
//! empty environment; `python3 -I` (isolated mode: no user site, no PYTHON* variables); a wall
//! clock timeout after which its whole process group is killed; rlimits on CPU seconds, address
//! space, file size, open files and core dumps. Where the machine allows (probed once, see
//! [`Isolation`]), also: a network namespace of its own (no interface but a down loopback);
//! Landlock, so it may write only beneath its directory and may not use TCP; and, when sdlm
//! runs as root, a user id of its own, so the process limit counts only this run's processes,
//! files of other users are protected by their permissions, and every process the run left
//! behind (even one that escaped the process group) is killed when it ends.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::landlock;

/// Where sandbox user ids start (far above any account a system creates).
const UID_BASE: u32 = 1_500_000_000;
/// Output kept of each stream.
const OUTPUT_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no python3 found (SDLM_SANDBOX_PYTHON, /usr/bin/python3, /usr/local/bin/python3, PATH); the sandbox runs Python programs")]
    NoPython,
    #[error("the sandbox cannot run {python}: {reason}")]
    Unusable { python: String, reason: String },
    #[error("sandbox: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Io { what, source }
}

/// What one run may use.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub wall: Duration,
    pub cpu_seconds: u64,
    pub memory_bytes: u64,
    /// Processes (and threads) of the run's user; applies only with [`Isolation::own_user`].
    pub processes: u64,
    pub file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            wall: Duration::from_secs(10),
            cpu_seconds: 10,
            memory_bytes: 1 << 30,
            processes: 64,
            file_bytes: 16 << 20,
        }
    }
}

/// What isolation this machine allows beyond the process group and rlimits.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Isolation {
    pub network_namespace: bool,
    /// Landlock ABI in use: writes only beneath the run's directory; no TCP from ABI 4.
    pub landlock_abi: Option<u32>,
    /// A user id per run (sdlm runs as root).
    pub own_user: bool,
}

impl Isolation {
    /// One line saying what is and is not isolated.
    pub fn describe(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "NO" };
        format!(
            "network namespace: {}; Landlock (writes only in its directory{}): {}; own user id (process limit, leftover processes killed): {}",
            yes_no(self.network_namespace),
            if self.landlock_abi.unwrap_or(0) >= 4 { ", no TCP" } else { "" },
            self.landlock_abi.map_or("NO".to_string(), |v| format!("ABI {v}")),
            yes_no(self.own_user),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Passed,
    Failed,
    TimedOut,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub seconds: f64,
    /// The user id the run had (with [`Isolation::own_user`]).
    pub uid: Option<u32>,
}

pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    isolation: Isolation,
}

/// Runs started by this process: each concurrent run needs a user id of its own.
static RUNS: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    /// Finds `python3` and probes what isolation works here.
    pub fn new(limits: Limits) -> Result<Self, SandboxError> {
        let python = find_python().ok_or(SandboxError::NoPython)?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut sandbox = Self {
            python,
            limits,
            isolation: Isolation {
                network_namespace: true,
                landlock_abi: landlock::abi_version(),
                own_user: root,
            },
        };
        // Namespaces may be refused (a container's seccomp profile, a sysctl): try once, after
        // making sure the rest works.
        sandbox.isolation.network_namespace = false;
        let unusable = |reason: String| SandboxError::Unusable {
            python: sandbox.python.display().to_string(),
            reason,
        };
        match sandbox.run_python("pass") {
            Ok(o) if o.verdict == Verdict::Passed => {}
            Ok(o) => return Err(unusable(format!("`pass` failed: {}", o.stderr.trim()))),
            Err(e) => return Err(unusable(e.to_string())),
        }
        sandbox.isolation.network_namespace = true;
        if !matches!(sandbox.run_python("pass"), Ok(o) if o.verdict == Verdict::Passed) {
            sandbox.isolation.network_namespace = false;
        }
        Ok(sandbox)
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Runs `program` with `python3 -I` in a fresh directory; passes when it exits with 0.
    pub fn run_python(&self, program: &str) -> Result<Outcome, SandboxError> {
        let dir = tempfile::Builder::new()
            .prefix("sdlm-sandbox-")
            .tempdir()
            .map_err(io("creating the run directory"))?;
        let main = dir.path().join("main.py");
        std::fs::write(&main, program).map_err(io("writing the program"))?;
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let uid = self
            .isolation
            .own_user
            .then(|| UID_BASE + (std::process::id() % 100_000) * 1000 + run % 1000);
        if let Some(uid) = uid {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid))
                .map_err(io("giving the run directory to the run's user"))?;
        }
        let dir_fd = std::fs::File::open(dir.path()).map_err(io("opening the run directory"))?;
        let mut command = Command::new(&self.python);
        command
            .args(["-I", "-B", "main.py"])
            .current_dir(dir.path())
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let confine = Confinement {
            limits: self.limits,
            network: self.isolation.network_namespace,
            landlock_abi: self.isolation.landlock_abi,
            dir_fd: dir_fd.as_raw_fd(),
            uid,
        };
        // SAFETY: the hook makes system calls only (see Confinement::apply).
        unsafe {
            command.pre_exec(move || confine.apply());
        }
        let start = Instant::now();
        let mut child = command.spawn().map_err(io("starting python3"))?;
        let pgid = child.id() as i32;
        let stdout = child.stdout.take().map(read_capped);
        let stderr = child.stderr.take().map(read_capped);
        let deadline = start + self.limits.wall;
        let (status, timed_out) = loop {
            match child.try_wait().map_err(io("waiting for the program"))? {
                Some(status) => break (status, false),
                None if Instant::now() >= deadline => {
                    kill_group(pgid);
                    let status = child.wait().map_err(io("waiting for the program"))?;
                    break (status, true);
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let seconds = start.elapsed().as_secs_f64();
        // Whatever it started and left running dies with it (and releases the output pipes).
        kill_group(pgid);
        if let Some(uid) = uid {
            kill_user(uid);
        }
        let text = |h: Option<std::thread::JoinHandle<String>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        // Out of CPU seconds is a timeout too: SIGXCPU at the soft limit, SIGKILL at the hard
        // one (whichever of the CPU and wall clocks runs out first depends on the load).
        let cpu_exhausted = matches!(status.signal(), Some(libc::SIGXCPU | libc::SIGKILL));
        let verdict = match (timed_out || cpu_exhausted, status.success()) {
            (true, _) => Verdict::TimedOut,
            (false, true) => Verdict::Passed,
            (false, false) => Verdict::Failed,
        };
        Ok(Outcome {
            verdict,
            exit_code: status.code(),
            signal: status.signal(),
            stdout: text(stdout),
            stderr: text(stderr),
            seconds,
            uid,
        })
    }
}

/// What the child does to itself between fork and exec.
#[derive(Clone, Copy)]
struct Confinement {
    limits: Limits,
    network: bool,
    landlock_abi: Option<u32>,
    dir_fd: i32,
    uid: Option<u32>,
}

impl Confinement {
    /// Runs in the forked child: only system calls (no allocation, no locks), as `pre_exec`
    /// requires.
    fn apply(&self) -> std::io::Result<()> {
        let check = |r: i32| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on values owned by this function.
        unsafe {
            check(libc::setpgid(0, 0))?;
            if self.network {
                let flags = if self.uid.is_some() {
                    libc::CLONE_NEWNET
                } else {
                    libc::CLONE_NEWUSER | libc::CLONE_NEWNET
                };
                check(libc::unshare(flags))?;
            }
            let limit = |resource, soft: u64, hard: u64| {
                let l = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                check(libc::setrlimit(resource, &l))
            };
            let l = self.limits;
            limit(libc::RLIMIT_CPU, l.cpu_seconds, l.cpu_seconds + 1)?;
            limit(libc::RLIMIT_AS, l.memory_bytes, l.memory_bytes)?;
            limit(libc::RLIMIT_FSIZE, l.file_bytes, l.file_bytes)?;
            limit(libc::RLIMIT_NOFILE, 256, 256)?;
            limit(libc::RLIMIT_CORE, 0, 0)?;
            if self.uid.is_some() {
                limit(libc::RLIMIT_NPROC, l.processes, l.processes)?;
            }
            if let Some(abi) = self.landlock_abi {
                landlock::restrict_self(abi, self.dir_fd)?;
            }
            if let Some(uid) = self.uid {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(uid))?;
                check(libc::setuid(uid))?;
            }
        }
        Ok(())
    }
}

fn kill_group(pgid: i32) {
    // SAFETY: signalling a process group we created; a stale id at worst fails with ESRCH.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Kills every process of `uid`: a child takes the uid and signals everything it may (all of
/// that uid's processes, wherever they moved), until none is left.
fn kill_user(uid: u32) {
    for _ in 0..50 {
        if processes_of(uid) == 0 {
            return;
        }
        // SAFETY: the child makes only async-signal-safe calls and exits.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                if libc::setuid(uid) == 0 {
                    libc::kill(-1, libc::SIGKILL);
                }
                libc::_exit(0);
            }
            if pid > 0 {
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Processes whose real user id is `uid`, zombies (dead, waiting to be reaped) excepted.
pub fn processes_of(uid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|status| {
            let field = |name: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            };
            field("Uid:").and_then(|u| u.parse::<u32>().ok()) == Some(uid)
                && field("State:").as_deref() != Some("Z")
        })
        .count()
}

fn read_capped(mut stream: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = OUTPUT_LIMIT.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

/// The interpreter to run: `SDLM_SANDBOX_PYTHON`, else the system's (a run's own user must be
/// able to execute it, which a version manager's shim under a private home is not), else the
/// first `python3` on PATH.
fn find_python() -> Option<PathBuf> {
    let chosen = std::env::var_os("SDLM_SANDBOX_PYTHON").map(PathBuf::from);
    let system = ["/usr/bin/python3", "/usr/local/bin/python3"].map(PathBuf::from);
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("python3"))
        .collect::<Vec<_>>();
    chosen
        .into_iter()
        .chain(system)
        .chain(on_path)
        .find(|p| p.is_file())
}

//! The sandbox on real Python programs: a correct solution passes and a wrong one fails; an
//! infinite loop is killed at the timeout; a fork bomb and a memory hog are contained; a program
//! cannot write outside its directory (the project included) or reach a TCP port.

use std::time::{Duration, Instant};

use sdlm_eval::{Limits, Sandbox, Verdict};

fn sandbox(wall_seconds: u64) -> Sandbox {
    let s = Sandbox::new(Limits {
        wall: Duration::from_secs(wall_seconds),
        cpu_seconds: wall_seconds,
        ..Limits::default()
    })
    .unwrap();
    eprintln!("isolation: {}", s.isolation().describe());
    s
}

#[test]
fn a_correct_solution_passes_and_a_wrong_one_fails() {
    let s = sandbox(10);
    let tests =
        "\ndef check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n\ncheck(add)\n";
    let right = s
        .run_python(&format!("def add(a, b):\n    return a + b\n{tests}"))
        .unwrap();
    assert_eq!(right.verdict, Verdict::Passed, "{}", right.stderr);
    let wrong = s
        .run_python(&format!("def add(a, b):\n    return a - b\n{tests}"))
        .unwrap();
    assert_eq!(wrong.verdict, Verdict::Failed);
    assert!(wrong.stderr.contains("AssertionError"), "{}", wrong.stderr);
    // The environment is empty.
    let env = s
        .run_python("import os, sys\nsys.exit(len(os.environ) > 1)\n")
        .unwrap();
    assert_eq!(env.verdict, Verdict::Passed, "environment: {}", env.stderr);
}

#[test]
fn an_infinite_loop_is_killed_at_the_timeout() {
    let s = sandbox(2);
    let start = Instant::now();
    let out = s.run_python("while True:\n    pass\n").unwrap();
    assert_eq!(out.verdict, Verdict::TimedOut);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_sleeping_child_left_behind_does_not_outlive_the_run() {
    let s = sandbox(2);
    // The child leaves the process group, then the parent exits at once.
    let program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n";
    let start = Instant::now();
    let out = s.run_python(program).unwrap();
    assert_eq!(out.verdict, Verdict::Passed, "{}", out.stderr);
    assert!(start.elapsed() < Duration::from_secs(4));
    if let Some(uid) = out.uid {
        assert_eq!(
            sdlm_eval::sandbox::processes_of(uid),
            0,
            "a process of the run survived"
        );
    }
}

#[test]
fn a_fork_bomb_is_contained() {
    let s = sandbox(3);
    let program =
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let start = Instant::now();
    let out = s.run_python(program).unwrap();
    assert_ne!(out.verdict, Verdict::Passed);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    if let Some(uid) = out.uid {
        assert_eq!(
            sdlm_eval::sandbox::processes_of(uid),
            0,
            "bomb processes survived"
        );
    }
    // The machine still runs programs.
    assert_eq!(s.run_python("pass").unwrap().verdict, Verdict::Passed);
}

#[test]
fn a_memory_hog_gets_a_memory_error() {
    let s = sandbox(10);
    let out = s.run_python("x = bytearray(8 << 30)\n").unwrap();
    assert_eq!(out.verdict, Verdict::Failed);
    assert!(out.stderr.contains("MemoryError"), "{}", out.stderr);
}

#[test]
fn a_program_cannot_write_outside_its_directory() {
    let s = sandbox(10);
    // A directory anyone may write to by its permissions: only the sandbox keeps the program
    // out. And the project's own directory.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        open.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let victim = open.path().join("keep.txt");
    std::fs::write(&victim, "original").unwrap();
    std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let project = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let intruder = project.join("sandbox-escape.txt");
    let program = format!(
        "import os\nfailed = 0\nfor act in [lambda: open({v:?}, 'w').write('changed'), lambda: os.remove({v:?}), lambda: open({n:?}, 'w').write('x'), lambda: open({i:?}, 'w').write('x')]:\n    try:\n        act()\n    except OSError:\n        failed += 1\nopen('inside.txt', 'w').write('fine')\nassert failed == 4, failed\n",
        v = victim.display().to_string(),
        n = open.path().join("new.txt").display().to_string(),
        i = intruder.display().to_string(),
    );
    let out = s.run_python(&program).unwrap();
    let escaped = intruder.exists();
    let _ = std::fs::remove_file(&intruder);
    assert!(!escaped, "the program wrote into the project");
    assert_eq!(out.verdict, Verdict::Passed, "{}", out.stderr);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
    assert!(!open.path().join("new.txt").exists());
}

#[test]
fn a_program_cannot_reach_a_tcp_port() {
    let s = sandbox(10);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let program = format!(
        "import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('127.0.0.1', {port}))\n    raise SystemExit(3)\nexcept OSError:\n    pass\n"
    );
    let out = s.run_python(&program).unwrap();
    assert_eq!(
        out.verdict,
        Verdict::Passed,
        "connected, or: {}",
        out.stderr
    );
}

//! Landlock (Linux ≥ 5.13) through its three system calls: a process restricts itself so that
//! it may write only beneath one directory, and (ABI ≥ 4) may neither bind nor connect TCP
//! sockets, and (ABI ≥ 6) may not signal processes outside its domain. Unlike permissions or a
//! separate user, this needs no privilege, so the sandbox confines writes even when it runs as
//! an ordinary user.
//!
//! [`restrict_self`] runs between `fork` and `exec`, so it makes system calls only: no
//! allocation, no locks.

use std::os::fd::RawFd;

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;

// Filesystem rights (linux/landlock.h); the write-like ones are what the sandbox handles.
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_REMOVE_DIR: u64 = 1 << 4;
const FS_REMOVE_FILE: u64 = 1 << 5;
const FS_MAKE_CHAR: u64 = 1 << 6;
const FS_MAKE_DIR: u64 = 1 << 7;
const FS_MAKE_REG: u64 = 1 << 8;
const FS_MAKE_SOCK: u64 = 1 << 9;
const FS_MAKE_FIFO: u64 = 1 << 10;
const FS_MAKE_BLOCK: u64 = 1 << 11;
const FS_MAKE_SYM: u64 = 1 << 12;
const FS_REFER: u64 = 1 << 13; // ABI 2
const FS_TRUNCATE: u64 = 1 << 14; // ABI 3
const NET_BIND_TCP: u64 = 1 << 0; // ABI 4
const NET_CONNECT_TCP: u64 = 1 << 1; // ABI 4
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0; // ABI 6
const SCOPE_SIGNAL: u64 = 1 << 1; // ABI 6

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version the kernel offers, or None when it has none (or it is disabled).
pub fn abi_version() -> Option<u32> {
    // SAFETY: the documented probe: a null attribute, size 0 and the version flag.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v as u32)
}

/// Restricts the calling process (and what it executes) to writing beneath `writable_dir` (an
/// open directory descriptor), without TCP, and scoped for signals where the ABI allows.
///
/// # Safety
/// Meant for a `pre_exec` hook: it only makes system calls, but `writable_dir` must be an open
/// descriptor.
pub unsafe fn restrict_self(abi: u32, writable_dir: RawFd) -> std::io::Result<()> {
    let mut fs = FS_WRITE_FILE
        | FS_REMOVE_DIR
        | FS_REMOVE_FILE
        | FS_MAKE_CHAR
        | FS_MAKE_DIR
        | FS_MAKE_REG
        | FS_MAKE_SOCK
        | FS_MAKE_FIFO
        | FS_MAKE_BLOCK
        | FS_MAKE_SYM;
    if abi >= 2 {
        fs |= FS_REFER;
    }
    if abi >= 3 {
        fs |= FS_TRUNCATE;
    }
    let attr = RulesetAttr {
        handled_access_fs: fs,
        handled_access_net: if abi >= 4 {
            NET_BIND_TCP | NET_CONNECT_TCP
        } else {
            0
        },
        scoped: if abi >= 6 {
            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        } else {
            0
        },
    };
    let ruleset = libc::syscall(
        libc::SYS_landlock_create_ruleset,
        &attr as *const RulesetAttr,
        std::mem::size_of::<RulesetAttr>(),
        0u32,
    );
    if ruleset < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let ruleset = ruleset as RawFd;
    let beneath = PathBeneathAttr {
        allowed_access: fs,
        parent_fd: writable_dir,
    };
    let result = (|| {
        if libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            RULE_PATH_BENEATH,
            &beneath as *const PathBeneathAttr,
            0u32,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })();
    libc::close(ruleset);
    result
}

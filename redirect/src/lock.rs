//! One `apply` or `remove` at a time per pin dir.
//!
//! The lock is an exclusive `flock` on the pin dir itself, so it lives on
//! the bpffs that every loader of the pod shares (an init container and a
//! CNI plugin see the same bpffs, not necessarily the same `/run`). A
//! `remove`, or an `apply` rolling back the pin dir it had created, deletes
//! the directory while holding the lock; a waiter then holds a lock on a
//! directory no longer reachable by its path. So, once locked, the path is
//! checked to still name the locked directory (same device and inode);
//! if not, the waiter starts again (creating the directory anew for an
//! `apply`, finding nothing applied for a `remove`).
//!
//! The lock goes with the file descriptor: it is released when the
//! [`PinDirLock`] is dropped, or when the process ends, however it ends.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::fs::create_private_dir_all;

/// How long `apply` and `remove` wait for the lock by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// How often a waiter tries again.
const POLL: Duration = Duration::from_millis(20);

/// An exclusive lock on a pin dir, held until dropped.
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
    created: Vec<PathBuf>,
}

impl PinDirLock {
    /// Locks `pin_dir`, creating it (and its missing parents, 0700) first
    /// when `create` is set. Waits up to `timeout` for another `apply` or
    /// `remove` to finish, saying so once. `Ok(None)`: `create` is not set
    /// and there is no such directory (any more).
    pub fn acquire(pin_dir: &Path, create: bool, timeout: Duration) -> Result<Option<PinDirLock>> {
        let deadline = Instant::now() + timeout;
        let mut said = false;
        loop {
            let created = if create {
                create_private_dir_all(pin_dir)
                    .with_context(|| format!("--pin-dir: cannot create {}", pin_dir.display()))?
            } else {
                Vec::new()
            };
            let dir = match File::open(pin_dir) {
                Ok(d) => d,
                // Removed between our mkdir and open: try again.
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(e).with_context(|| format!("--pin-dir {}", pin_dir.display()));
                }
            };
            loop {
                match flock(&dir, libc::LOCK_EX | libc::LOCK_NB) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("locking the pin dir {}", pin_dir.display()));
                    }
                }
                if !said {
                    tracing::warn!(
                        "another redirect apply or remove is running on {}: waiting up to {} s \
                         for it to finish",
                        pin_dir.display(),
                        timeout.as_secs()
                    );
                    said = true;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "--pin-dir {}: another redirect apply or remove still holds its lock \
                         after {} s; nothing was changed (try again, or raise --lock-timeout)",
                        pin_dir.display(),
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(POLL);
            }
            if same_file(&dir, pin_dir)? {
                if said {
                    tracing::info!("got the lock on {}", pin_dir.display());
                }
                return Ok(Some(PinDirLock { _dir: dir, created }));
            }
            // The directory we locked was removed (and maybe made again)
            // by the run that held the lock: start again on what the path
            // names now.
            tracing::debug!(
                "{} was replaced while waiting for its lock",
                pin_dir.display()
            );
        }
    }

    /// Directories this call created (the pin dir and missing parents,
    /// outermost first).
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }
}

/// Whether another `apply` or `remove` holds the lock on `pin_dir` right now
/// (`status` uses it to tell a generation being built from an interrupted
/// one). Takes nothing: a shared lock is tried and dropped at once.
pub fn is_busy(pin_dir: &Path) -> bool {
    let Ok(dir) = File::open(pin_dir) else {
        return false;
    };
    matches!(
        flock(&dir, libc::LOCK_SH | libc::LOCK_NB),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

fn flock(file: &File, how: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether `path` still names the open directory `dir`.
fn same_file(dir: &File, path: &Path) -> Result<bool> {
    let held = dir.metadata().context("fstat on the locked pin dir")?;
    Ok(match std::fs::metadata(path) {
        Ok(now) => (now.dev(), now.ino()) == (held.dev(), held.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("--pin-dir {}", path.display())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_locker_waits_then_times_out() {
        let dir = std::env::temp_dir().join(format!("redirect-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = PinDirLock::acquire(&dir, true, DEFAULT_TIMEOUT)
            .unwrap()
            .unwrap();
        assert_eq!(first.created(), std::slice::from_ref(&dir));
        assert!(is_busy(&dir));
        // flock locks belong to the open file: a second open in the same
        // process conflicts like another process would.
        let t = Instant::now();
        let e = PinDirLock::acquire(&dir, true, Duration::from_millis(100)).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(100));
        let e = e.to_string();
        assert!(
            e.contains("still holds its lock") && e.contains("--lock-timeout"),
            "{e}"
        );
        drop(first);
        assert!(!is_busy(&dir));
        let again = PinDirLock::acquire(&dir, false, DEFAULT_TIMEOUT).unwrap();
        assert!(again.unwrap().created().is_empty());
        std::fs::remove_dir(&dir).unwrap();
        assert!(
            PinDirLock::acquire(&dir, false, DEFAULT_TIMEOUT)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_waiter_follows_a_removed_directory() {
        let dir = std::env::temp_dir().join(format!("redirect-lock2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = PinDirLock::acquire(&dir, true, DEFAULT_TIMEOUT)
            .unwrap()
            .unwrap();
        let d = dir.clone();
        let waiter = std::thread::spawn(move || {
            PinDirLock::acquire(&d, true, DEFAULT_TIMEOUT)
                .unwrap()
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(100));
        // The holder removes the directory, as a rollback would.
        std::fs::remove_dir(&dir).unwrap();
        drop(first);
        let second = waiter.join().unwrap();
        assert!(dir.is_dir(), "the waiter made the directory again");
        assert_eq!(second.created(), std::slice::from_ref(&dir));
        drop(second);
        std::fs::remove_dir(&dir).unwrap();
    }
}

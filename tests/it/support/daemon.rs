//! `fluxlora serve` as a child process that a test kills, limits and restarts:
//! [`Daemon::start`] runs it on a free port with extra environment and,
//! optionally, a file-size limit (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored so a
//! write past the limit fails with `EFBIG` instead of killing the process); its
//! log lines are kept, so a test can wait for one. Dropping it SIGKILLs it.

use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use super::app::{serve_command, start_serving, App};

/// A running `fluxlora serve`.
pub struct Daemon {
    child: std::process::Child,
    pub app: App,
    log: Receiver<String>,
}

impl Daemon {
    /// Starts the daemon on `data_dir` with `root` as its one root, `env` set, and
    /// every file it writes limited to `file_size_limit` bytes when given.
    pub fn start(
        data_dir: &Path,
        root: &Path,
        env: &[(&str, &str)],
        file_size_limit: Option<u64>,
    ) -> Self {
        let mut command = serve_command(data_dir, root);
        command.envs(env.iter().copied());
        if let Some(limit) = file_size_limit {
            limit_file_size(&mut command, limit);
        }
        let (tx, log) = std::sync::mpsc::channel();
        let (child, app) = start_serving(command, tx);
        Self { child, app, log }
    }

    /// Waits for a log line containing `needle` (lines before it are skipped).
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("the daemon never logged `{needle}`: {e}"),
            }
        }
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes the child's writes past `limit` bytes of any file fail with `EFBIG`.
fn limit_file_size(command: &mut std::process::Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    let rlimit = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (signal and setrlimit), on values prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
                || libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

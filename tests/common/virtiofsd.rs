//! A real virtiofsd, started as Kata starts it: one share, one socket, one
//! client; it exits when the VMM closes the connection.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// virtiofsd's path (scripts/virtiofsd.sh finds it, or installs it once).
pub fn binary() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/virtiofsd.sh");
    let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("run scripts/virtiofsd.sh");
    assert!(out.status.success(), "scripts/virtiofsd.sh failed ({}): it installs virtiofsd from crates.io", out.status);
    PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default())
}

pub struct Virtiofsd {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Virtiofsd {
    /// Serves `share` on `dir/virtiofsd.sock`; returns once the socket exists.
    pub fn start(dir: &Path, share: &Path) -> Virtiofsd {
        let socket = dir.join("virtiofsd.sock");
        let log = dir.join("virtiofsd.log");
        // No sandbox: the tests may run without the privileges its namespaces need.
        let child = Command::new(binary())
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(share)
            .args(["--sandbox", "none", "--cache", "never", "--thread-pool-size", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("virtiofsd log"))
            .spawn()
            .expect("start virtiofsd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "virtiofsd made no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Virtiofsd { child, socket, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for virtiofsd to exit (it does when its client disconnects).
    pub fn wait_for_exit(&mut self, timeout: Duration) -> bool {
        !super::wait_with_timeout(&mut self.child, timeout).1
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

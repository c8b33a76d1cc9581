//! Expect-style access to the guest's serial console: a reader thread keeps
//! everything the guest prints, callers wait for markers (never sleeps).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::BackendError;

#[derive(Default)]
struct Shared {
    text: Vec<u8>,
    closed: bool,
}

pub struct Console {
    writer: Mutex<UnixStream>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    cursor: Mutex<usize>,
    seq: AtomicU64,
}

/// Output of one shell command run through [`Console::run`].
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub output: String,
    pub status: i32,
}

impl Console {
    pub fn connect(path: &Path) -> Result<Self, BackendError> {
        let stream = crate::error::connect_unix(path, "serial console socket")?;
        let mut reader = stream.try_clone().map_err(|source| BackendError::Io {
            what: "serial console",
            source,
        })?;
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let bg = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("lucos-console".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let n = reader.read(&mut buf).unwrap_or(0);
                    let (lock, cv) = &*bg;
                    let mut s = lock.lock().unwrap();
                    if n == 0 {
                        s.closed = true;
                        cv.notify_all();
                        return;
                    }
                    s.text.extend_from_slice(&buf[..n]);
                    cv.notify_all();
                }
            })
            .map_err(|source| BackendError::Io {
                what: "console thread",
                source,
            })?;
        Ok(Console {
            writer: Mutex::new(stream),
            shared,
            cursor: Mutex::new(0),
            seq: AtomicU64::new(0),
        })
    }

    /// Everything the guest printed since connect.
    pub fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.shared.0.lock().unwrap().text).into_owned()
    }

    pub fn send(&self, text: &str) -> Result<(), BackendError> {
        self.writer
            .lock()
            .unwrap()
            .write_all(text.as_bytes())
            .map_err(|source| BackendError::Io {
                what: "serial console",
                source,
            })
    }

    /// Waits until `needle` appears after the cursor; returns the text up to
    /// and including it and moves the cursor past it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, BackendError> {
        let deadline = Instant::now() + timeout;
        let mut cursor = self.cursor.lock().unwrap();
        let (lock, cv) = &*self.shared;
        let mut s = lock.lock().unwrap();
        loop {
            let hay = &s.text[(*cursor).min(s.text.len())..];
            if let Some(pos) = find(hay, needle.as_bytes()) {
                let end = *cursor + pos + needle.len();
                let out = String::from_utf8_lossy(&s.text[*cursor..end]).into_owned();
                *cursor = end;
                return Ok(out);
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                let tail = String::from_utf8_lossy(&s.text[s.text.len().saturating_sub(2000)..])
                    .into_owned();
                return Err(BackendError::Timeout {
                    what: format!(
                        "'{needle}' on the serial console{}; last output:\n{tail}",
                        if s.closed {
                            " (console closed: QEMU exited?)"
                        } else {
                            ""
                        }
                    ),
                    secs: timeout.as_secs_f64(),
                });
            }
            s = cv.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    /// Waits for the next complete line containing `needle` and returns it
    /// (without the line break).
    pub fn next_line_with(&self, needle: &str, timeout: Duration) -> Result<String, BackendError> {
        let upto = self.wait_for(needle, timeout)?;
        let head = upto.rsplit('\n').next().unwrap_or_default().to_owned();
        let tail = self.wait_for("\n", timeout)?;
        Ok(format!("{head}{tail}").trim_end().replace('\r', ""))
    }

    /// Runs a shell command at the guest prompt and returns its output and
    /// exit status. Output is framed by start/end markers that are split in
    /// the typed line, so an echo of the command itself cannot match them;
    /// this works with the tty echoing or not.
    pub fn run(&self, cmd: &str, timeout: Duration) -> Result<CommandOutput, BackendError> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let start = format!("__LUCOS_START_{n}__");
        let done = format!("__LUCOS_DONE_{n}__");
        // `cmd &; ...` is a syntax error: a trailing `&` already separates.
        let sep = if cmd.trim_end().ends_with('&') {
            " "
        } else {
            "; "
        };
        self.send(&format!(
            "echo __LUCOS_\"\"START_{n}__; {cmd}{sep}echo __LUCOS_\"\"DONE_{n}__ $?\n"
        ))?;
        self.wait_for(&start, timeout)?;
        let text = self.wait_for(&done, timeout)?;
        let status_line = self.wait_for("\n", timeout)?;
        let status = status_line.trim().parse().unwrap_or(-1);
        let output = text[..text.len() - done.len()]
            .trim_start_matches(['\r', '\n'])
            .replace('\r', "");
        Ok(CommandOutput { output, status })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake guest shell on a socket: echoes input and runs `echo`.
    #[test]
    fn run_collects_output_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let guest = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"LUCOS-BOOTED\r\nlucos# ").unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let line = String::from_utf8(line).unwrap();
            // Echo the typed line, then act like `sh` on its three parts.
            s.write_all(line.as_bytes()).unwrap();
            let line = line.replace("\"\"", "");
            let parts: Vec<&str> = line.split("; ").collect();
            let start = parts[0].trim_start_matches("echo ");
            let done = parts[2].trim_start_matches("echo ").replace(" $?", "");
            let reply = format!("\r\n{start}\r\nhello world\r\n{done} 3\r\nlucos# ");
            s.write_all(reply.as_bytes()).unwrap();
        });
        let c = Console::connect(&path).unwrap();
        c.wait_for("LUCOS-BOOTED", Duration::from_secs(5)).unwrap();
        let out = c.run("echo hello world", Duration::from_secs(5)).unwrap();
        assert_eq!(out.output.trim(), "hello world");
        assert_eq!(out.status, 3);
        guest.join().unwrap();
        let err = c.wait_for("never", Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("never"));
    }
}

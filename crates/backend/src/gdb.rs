//! gdb remote serial protocol client for QEMU's gdbstub.
//!
//! Used for what QMP cannot do: memory writes that invalidate TCG's
//! translated blocks (writes through the shared RAM file
//! are not seen by code QEMU has already translated). Memory access runs in
//! QEMU's physical-memory mode (`Qqemu.PhyMemMode:1`).
//!
//! QEMU sends an unsolicited stop reply whenever the VM stops (also for QMP
//! `stop`), so replies that look like stop packets are skipped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::BackendError;

/// QEMU's MAX_PACKET_LENGTH is 4096; stay well under it with hex payloads.
const CHUNK: usize = 1024;

pub struct Gdb {
    stream: UnixStream,
    path: std::path::PathBuf,
    buf: Vec<u8>,
    threads: Vec<String>,
    /// Whether packets must still be acknowledged (QEMU before 8.x has no
    /// QStartNoAckMode).
    ack: bool,
}

fn io(source: std::io::Error) -> BackendError {
    BackendError::Io {
        what: "gdbstub",
        source,
    }
}

fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// Undoes RSP escaping (`}` + byte ^ 0x20) in a reply.
fn unescape(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut it = data.iter();
    while let Some(&b) = it.next() {
        if b == b'}' {
            if let Some(&n) = it.next() {
                out.push(n ^ 0x20);
            }
        } else {
            out.push(b);
        }
    }
    out
}

fn is_stop_reply(p: &[u8]) -> bool {
    matches!(p.first(), Some(b'T' | b'S' | b'W'))
        && p.get(1..3)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
}

impl Gdb {
    /// Connects. Note QEMU pauses the VM when a gdb client connects; the
    /// caller restores the run state it wants.
    pub fn connect(path: &Path) -> Result<Self, BackendError> {
        let stream = crate::error::connect_unix(path, "gdbstub socket")?;
        // QEMU serves one gdb client; a busy socket accepts but never answers.
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        let mut gdb = Gdb {
            stream,
            path: path.to_owned(),
            buf: Vec::new(),
            threads: Vec::new(),
            ack: true,
        };
        // The reply to QStartNoAckMode is still acknowledged; the stop
        // notification of the connect-time pause may come first.
        if gdb.request(b"QStartNoAckMode")? == b"OK" {
            gdb.ack = false;
        }
        gdb.request(b"qSupported")?;
        gdb.expect_ok(
            b"Qqemu.PhyMemMode:1",
            "physical memory mode (QEMU >= 4.1 needed)",
        )?;
        // QEMU answers 'p' (single register) only after the client has read
        // its target description.
        gdb.request(b"qXfer:features:read:target.xml:0,ffb")?;
        let mut reply = gdb.request(b"qfThreadInfo")?;
        while let Some((b'm', rest)) = reply.split_first() {
            gdb.threads
                .extend(String::from_utf8_lossy(rest).split(',').map(str::to_owned));
            reply = gdb.request(b"qsThreadInfo")?;
        }
        gdb.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        Ok(gdb)
    }

    fn send_raw(&mut self, payload: &[u8]) -> Result<(), BackendError> {
        let mut pkt = Vec::with_capacity(payload.len() + 4);
        pkt.push(b'$');
        pkt.extend_from_slice(payload);
        pkt.extend_from_slice(format!("#{:02x}", checksum(payload)).as_bytes());
        self.stream.write_all(&pkt).map_err(io)
    }

    fn fill(&mut self) -> Result<(), BackendError> {
        let mut tmp = [0u8; 8192];
        let n = self.stream.read(&mut tmp).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => BackendError::Timeout {
                what: format!(
                    "the gdbstub at {} to answer; is another debugger attached to it? Detach it and retry",
                    self.path.display()
                ),
                secs: self.stream.read_timeout().ok().flatten().map_or(0.0, |d| d.as_secs_f64()),
            },
            _ => io(e),
        })?;
        if n == 0 {
            return Err(BackendError::Gdb(
                "QEMU closed the gdbstub connection".into(),
            ));
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }

    /// Takes one complete packet out of the buffer, acknowledging it unless
    /// no-ack mode is on; `None` until a whole packet has arrived.
    fn take_packet(&mut self) -> Result<Option<Vec<u8>>, BackendError> {
        // Drop acks/noise before '$'.
        let Some(start) = self.buf.iter().position(|&b| b == b'$') else {
            self.buf.clear();
            return Ok(None);
        };
        self.buf.drain(..start);
        let Some(hash) = self.buf.iter().position(|&b| b == b'#') else {
            return Ok(None);
        };
        if self.buf.len() < hash + 3 {
            return Ok(None);
        }
        let body = self.buf[1..hash].to_vec();
        let sum = std::str::from_utf8(&self.buf[hash + 1..hash + 3])
            .ok()
            .and_then(|s| u8::from_str_radix(s, 16).ok());
        self.buf.drain(..hash + 3);
        if sum != Some(checksum(&body)) {
            return Err(BackendError::Gdb("packet checksum mismatch".into()));
        }
        if self.ack {
            self.stream.write_all(b"+").map_err(io)?;
        }
        Ok(Some(unescape(&body)))
    }

    /// Receives one packet.
    fn recv(&mut self) -> Result<Vec<u8>, BackendError> {
        loop {
            if let Some(p) = self.take_packet()? {
                return Ok(p);
            }
            self.fill()?;
        }
    }

    /// Reads and discards what QEMU sent without being asked: the stop
    /// notification it writes to the gdb client on every QMP `stop`. Nobody
    /// reads them between requests, so without this they pile up in the
    /// socket until QEMU's main loop blocks writing one, and QMP stops
    /// answering with the VM paused (measured: at the 288th `stop` of
    /// `lucos bench`). Called with no request in flight, so everything
    /// buffered is unsolicited; a partial packet stays for the next read.
    pub fn drain_notifications(&mut self) -> Result<(), BackendError> {
        self.stream.set_nonblocking(true).map_err(io)?;
        let mut tmp = [0u8; 4096];
        let read = loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => {
                    break Err(BackendError::Gdb(
                        "QEMU closed the gdbstub connection".into(),
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(io(e)),
            }
        };
        self.stream.set_nonblocking(false).map_err(io)?;
        read?;
        while let Some(p) = self.take_packet()? {
            tracing::trace!(packet = %String::from_utf8_lossy(&p), "gdbstub notification discarded");
        }
        Ok(())
    }

    /// Sends a packet and returns the first reply that is not an
    /// asynchronous stop notification.
    pub fn request(&mut self, payload: &[u8]) -> Result<Vec<u8>, BackendError> {
        tracing::trace!(packet = %String::from_utf8_lossy(&payload[..payload.len().min(40)]), "gdb send");
        self.send_raw(payload)?;
        loop {
            let reply = self.recv()?;
            if is_stop_reply(&reply) {
                tracing::trace!(reply = %String::from_utf8_lossy(&reply), "gdbstub stop notification");
                continue;
            }
            return Ok(reply);
        }
    }

    fn expect_ok(&mut self, payload: &[u8], what: &str) -> Result<(), BackendError> {
        let reply = self.request(payload)?;
        if reply != b"OK" {
            return Err(BackendError::Gdb(format!(
                "{what}: gdbstub answered '{}'",
                String::from_utf8_lossy(&reply)
            )));
        }
        Ok(())
    }

    /// RIP of vCPU `idx` (gdb register 16 on x86-64; stable across QEMU
    /// versions, unlike the rest of the 'g' layout). VM must be paused.
    pub fn rip(&mut self, idx: usize) -> Result<u64, BackendError> {
        let thread = self
            .threads
            .get(idx)
            .ok_or_else(|| {
                BackendError::Gdb(format!(
                    "no vCPU {idx} among gdb threads {:?}",
                    self.threads
                ))
            })?
            .clone();
        self.expect_ok(format!("Hg{thread}").as_bytes(), "select vCPU")?;
        let reply = self.request(b"p10")?;
        let bytes = hex::decode(&reply)
            .ok()
            .filter(|b| b.len() == 8)
            .ok_or_else(|| {
                BackendError::Gdb(format!(
                    "bad RIP reply '{}'",
                    String::from_utf8_lossy(&reply)
                ))
            })?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    /// Writes guest physical memory through QEMU, which invalidates any
    /// translated code covering those bytes.
    pub fn write_phys(&mut self, pa: u64, data: &[u8]) -> Result<(), BackendError> {
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            let addr = pa + (i * CHUNK) as u64;
            let pkt = format!("M{addr:x},{:x}:{}", chunk.len(), hex::encode(chunk));
            self.expect_ok(pkt.as_bytes(), &format!("write guest physical {addr:#x}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescaping_restores_special_bytes() {
        assert_eq!(unescape(b"a}\x03b}\x04c}]d}\x0ae"), b"a#b$c}d*e".to_vec());
    }

    #[test]
    fn stop_replies_are_recognised() {
        assert!(is_stop_reply(b"T02thread:01;"));
        assert!(is_stop_reply(b"S05"));
        assert!(!is_stop_reply(b"OK"));
        assert!(!is_stop_reply(b"0f1f440000"));
    }
}

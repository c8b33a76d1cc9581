//! Minimal QMP client (docs/interop/qmp-spec): one command in flight,
//! asynchronous events skipped but counted.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use lucos_introspect::VcpuRegs;

use crate::error::BackendError;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

fn io(source: std::io::Error) -> BackendError {
    BackendError::Io {
        what: "QMP",
        source,
    }
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Self, BackendError> {
        Self::connect_timeout(path, Duration::from_secs(30))
    }

    /// Connects; QEMU serves one QMP client at a time, so a missing
    /// greeting means another client holds the socket.
    pub fn connect_timeout(path: &Path, timeout: Duration) -> Result<Self, BackendError> {
        let stream = crate::error::connect_unix(path, "QMP socket")?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        };
        let greeting = qmp.read_message().map_err(|e| match e {
            BackendError::Timeout { .. } => BackendError::Qmp(
                "QEMU sent no QMP greeting: another client (another lucos process?) holds the QMP socket".into(),
            ),
            e => e,
        })?;
        if greeting.get("QMP").is_none() {
            return Err(BackendError::Qmp(format!("unexpected greeting {greeting}")));
        }
        qmp.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io)?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, BackendError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => BackendError::Timeout {
                    what: "QEMU to answer on QMP (is the VM wedged, or another client holding the socket?)".into(),
                    secs: 30.0,
                },
                _ => io(e),
            })?;
            if n == 0 {
                return Err(BackendError::Qmp("QEMU closed the QMP socket".into()));
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line).map_err(|source| BackendError::QmpJson {
                line: line.clone(),
                source,
            });
        }
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, BackendError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).map_err(io)?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                tracing::trace!(event = %reply["event"], "QMP event");
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(err) = reply.get("error") {
                return Err(BackendError::QmpCommand {
                    command: command.to_owned(),
                    class: err["class"].as_str().unwrap_or("?").to_owned(),
                    desc: err["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// The underlying socket (for its peer credentials).
    pub fn stream(&self) -> &UnixStream {
        &self.writer
    }

    pub fn stop(&mut self) -> Result<(), BackendError> {
        self.execute("stop", None).map(drop)
    }

    pub fn cont(&mut self) -> Result<(), BackendError> {
        self.execute("cont", None).map(drop)
    }

    pub fn running(&mut self) -> Result<bool, BackendError> {
        let st = self.execute("query-status", None)?;
        Ok(st["running"].as_bool().unwrap_or(false))
    }

    pub fn quit(&mut self) -> Result<(), BackendError> {
        self.execute("quit", None).map(drop)
    }

    /// An HMP command through QMP; used only for state QMP has no command for (IDTR).
    pub fn hmp(
        &mut self,
        command_line: &str,
        cpu_index: Option<usize>,
    ) -> Result<String, BackendError> {
        let mut args = json!({ "command-line": command_line });
        if let Some(cpu) = cpu_index {
            args["cpu-index"] = json!(cpu);
        }
        let v = self.execute("human-monitor-command", Some(args))?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Guest-physical address and size of a PCI device's memory BAR.
    pub fn pci_bar(&mut self, qdev_id: &str, bar: u64) -> Result<Option<(u64, u64)>, BackendError> {
        let buses = self.execute("query-pci", None)?;
        Ok(find_bar(&buses, qdev_id, bar))
    }
}

fn find_bar(buses: &Value, qdev_id: &str, bar: u64) -> Option<(u64, u64)> {
    for bus in buses.as_array()? {
        for dev in bus["devices"].as_array().into_iter().flatten() {
            if dev["qdev_id"].as_str() != Some(qdev_id) {
                continue;
            }
            for region in dev["regions"].as_array().into_iter().flatten() {
                if region["bar"].as_u64() == Some(bar) && region["type"] == "memory" {
                    return Some((region["address"].as_u64()?, region["size"].as_u64()?));
                }
            }
        }
    }
    None
}

/// Parses one vCPU's HMP `info registers` dump. QEMU's gdbstub layout for
/// x86-64 changed across versions (its target XML and `g` packet disagree in
/// 7.2), while this dump has named fields.
pub fn parse_info_registers(text: &str) -> Option<VcpuRegs> {
    let mut fields = std::collections::HashMap::new();
    for line in text.lines() {
        let line = line.trim_start();
        // Segment lines: "GS =0000 ffff935a1f500000 00000000 00000000".
        if let Some(seg) = line
            .get(..4)
            .filter(|p| p.ends_with(" =") || p.ends_with("="))
        {
            let name = seg.trim_end_matches('=').trim();
            if matches!(name, "ES" | "CS" | "SS" | "DS" | "FS" | "GS") {
                let mut parts = line[line.find('=')? + 1..].split_whitespace();
                fields.insert(name.to_owned(), parts.next()?.to_owned());
                fields.insert(format!("{name}_BASE"), parts.next()?.to_owned());
                continue;
            }
        }
        // "R8 =...": glue the padded names, then split NAME=VALUE tokens.
        let glued = line.replace(" =", "=");
        for tok in glued.split_whitespace() {
            if let Some((k, v)) = tok.split_once('=') {
                fields.entry(k.to_owned()).or_insert_with(|| v.to_owned());
            }
        }
    }
    let hex = |k: &str| fields.get(k).and_then(|v| u64::from_str_radix(v, 16).ok());
    const GPR: [&str; 16] = [
        "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP", "R8", "R9", "R10", "R11", "R12",
        "R13", "R14", "R15",
    ];
    let mut gpr = [0u64; 16];
    for (slot, name) in gpr.iter_mut().zip(GPR) {
        *slot = hex(name)?;
    }
    Some(VcpuRegs {
        gpr,
        rip: hex("RIP")?,
        rflags: hex("RFL")?,
        cs: hex("CS")?,
        fs_base: hex("FS_BASE")?,
        gs_base: hex("GS_BASE")?,
        cr0: hex("CR0")?,
        cr2: hex("CR2")?,
        cr3: hex("CR3")?,
        cr4: hex("CR4")?,
        efer: hex("EFER")?,
    })
}

/// Parses the IDT base out of HMP `info registers` ("IDT=     fffffe0000000000 00000fff").
pub fn parse_idt_base(info_registers: &str) -> Option<u64> {
    let rest = info_registers.split("IDT=").nth(1)?;
    let hex = rest.split_whitespace().next()?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "\nCPU#1\nRAX=0000000000000000 RBX=ffff935a00246000 RCX=0000000000000000 RDX=0000000000000000
RSI=0000000000000000 RDI=000000000002efc4 RBP=0000000000000000 RSP=ffffafb5c007bef8
R8 =ffff935a1f500000 R9 =0000000000000000 R10=0000000000000001 R11=0000000000000000
R12=0000000000000000 R13=0000000000000001 R14=0000000000000000 R15=00000000000000ff
RIP=ffffffffb9c2a973 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 0000000000000000 00000000 00000000
CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]
SS =0018 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]
DS =0000 0000000000000000 00000000 00000000
FS =0000 0000000000000000 00000000 00000000
GS =0000 ffff935a1f500000 00000000 00000000
LDT=0000 0000000000000000 00000000 00008200 DPL=0 LDT
TR =0040 fffffe000003e000 00000067 00008900 DPL=0 TSS64-avl
GDT=     fffffe000003c000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=000000001f255cb8 CR3=0000000000c6f000 CR4=000006a0
EFER=0000000000000d01
FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80
XMM00=00000000005e42a0 0000000000000000 XMM01=00000000005e22c0 000000000042ccc9\n";

    #[test]
    fn registers_from_info_registers() {
        let r = parse_info_registers(DUMP).unwrap();
        assert_eq!(r.gpr[1], 0xffff935a00246000);
        assert_eq!(r.gpr[8], 0xffff935a1f500000, "padded R8 name");
        assert_eq!(r.gpr[15], 0xff);
        assert_eq!(r.rsp(), 0xffffafb5c007bef8);
        assert_eq!(r.rip, 0xffffffffb9c2a973);
        assert_eq!(r.rflags, 0x246);
        assert_eq!(r.cs, 0x10);
        assert_eq!(r.cpl(), 0);
        assert_eq!(r.gs_base, 0xffff935a1f500000);
        assert_eq!(
            (r.cr0, r.cr3, r.cr4, r.efer),
            (0x80050033, 0xc6f000, 0x6a0, 0xd01)
        );
        assert_eq!(parse_idt_base(DUMP), Some(0xfffffe0000000000));
        assert!(
            parse_info_registers("RAX=0").is_none(),
            "incomplete dumps are refused"
        );
    }

    #[test]
    fn idt_base_from_info_registers() {
        let text = "RAX=0000000000000000 RBX=ffffffff82613940\nGDT=     fffffe0000001000 0000007f\nIDT=     fffffe0000000000 00000fff\nCR0=80050033";
        assert_eq!(parse_idt_base(text), Some(0xfffffe0000000000));
        assert_eq!(parse_idt_base("no idt here"), None);
    }

    #[test]
    fn bar_lookup_by_qdev_id() {
        let v = json!([{ "bus": 0, "devices": [
            { "qdev_id": "", "regions": [] },
            { "qdev_id": "lucos-patch", "regions": [
                { "bar": 0, "type": "memory", "address": 0xfebf1000u64, "size": 256 },
                { "bar": 2, "type": "memory", "address": 0xfe000000u64, "size": 8388608 } ] } ] }]);
        assert_eq!(find_bar(&v, "lucos-patch", 2), Some((0xfe000000, 8 << 20)));
        assert_eq!(find_bar(&v, "lucos-patch", 4), None);
        assert_eq!(find_bar(&v, "other", 2), None);
    }
}

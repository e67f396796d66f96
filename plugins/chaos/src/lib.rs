//! A plugin for testing isolation: the record value says what to do.
//! `loop` spins forever, `bomb` allocates until the memory cap, `panic` panics, `fail`
//! returns an error, `emit-undeclared` emits to a topic it was not deployed with, `huge` emits
//! a 2 MiB record (over the broker's record limit), `big` emits 3.2 MB of outputs and writes a
//! 300 KB state value in one batch, `escape` tries the sandbox's walls (files, environment,
//! network, clock) and emits what it found; anything
//! else is echoed to `chaos.out` and counted in state.

use weir_sdk::{consumer, Context, Record, Result};

/// Misbehaves as the record asks.
#[consumer]
pub fn chaos(record: &Record, ctx: &mut Context) -> Result<()> {
    match record.value() {
        b"loop" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        b"bomb" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        b"panic" => panic!("poison record at offset {}", record.offset()),
        b"fail" => Err("refusing this record".into()),
        b"big" => {
            for i in 0..8u8 {
                ctx.emit("chaos.out", None, vec![i; 400 * 1024]);
            }
            ctx.put("big", &vec![7u8; 300 * 1024])?;
            Ok(())
        }
        b"huge" => {
            ctx.emit("chaos.out", None, vec![b'x'; 2 << 20]);
            Ok(())
        }
        b"emit-undeclared" => {
            ctx.emit("somewhere.else", None, "x");
            Ok(())
        }
        b"escape" => {
            let fs = match std::fs::read("/etc/passwd") {
                Ok(_) => "read",
                Err(_) => "denied",
            };
            let dir = match std::fs::read_dir(".") {
                Ok(_) => "listed",
                Err(_) => "denied",
            };
            let write = match std::fs::write("escape.txt", b"x") {
                Ok(()) => "written",
                Err(_) => "denied",
            };
            let env = std::env::vars().count();
            let net = match std::net::TcpStream::connect("127.0.0.1:7070") {
                Ok(_) => "connected",
                Err(_) => "denied",
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(u128::MAX);
            ctx.emit(
                "chaos.out",
                None,
                format!("fs={fs} dir={dir} write={write} env={env} net={net} clock_ms={now}"),
            );
            Ok(())
        }
        value if value.starts_with(b"slow:") => {
            let millions: u64 = std::str::from_utf8(&value[5..])
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or("slow:N needs a number")?;
            let mut x: u64 = 0;
            for _ in 0..millions * 1_000_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            ctx.emit("chaos.out", record.key(), value.to_vec());
            Ok(())
        }
        value => {
            let seen = ctx.get::<u64>("seen")?.unwrap_or(0) + 1;
            ctx.put("seen", &seen)?;
            println!("echo {}", String::from_utf8_lossy(value));
            ctx.emit("chaos.out", record.key(), value.to_vec());
            Ok(())
        }
    }
}

//! Pushes data through stdin → `cat` → stdout of a container and checks a
//! checksum on both sides; prints the throughput.
//!
//! 1 GiB took 13 s here (2 shared cores, debug build), so it runs with the
//! normal tests; `--nocapture` shows the figure, `CLOISTER_STDIO_MIB=<n>`
//! changes the size.

mod support;

use std::time::Instant;

use cloister_protocol::agent;
use cloister_protocol::stdio::StreamKind;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Order-sensitive 64-bit checksum (FNV-1a over 8-byte words).
#[derive(Default)]
struct Checksum {
    hash: u64,
    bytes: u64,
}

impl Checksum {
    fn update(&mut self, data: &[u8]) {
        let mut h = if self.bytes == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.hash
        };
        assert!(data.len().is_multiple_of(8) || self.bytes.is_multiple_of(8));
        for chunk in data.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x0100_0000_01b3);
        }
        self.hash = h;
        self.bytes += data.len() as u64;
    }
}

async fn push_through_cat(mib: u64) {
    let agent = TestAgent::start().await;
    let request = create_request(
        "pipe",
        &agent.rootfs,
        &spec(&["cat"]),
        stdio(true, true, false, false),
    );
    agent
        .client
        .create_container(ctx(), &request)
        .await
        .unwrap();
    let mut input = agent.attach("pipe", "", StreamKind::Stdin).await.unwrap();
    let mut output = agent.attach("pipe", "", StreamKind::Stdout).await.unwrap();
    let mut start = agent::StartContainerRequest::new();
    start.container_id = "pipe".into();
    agent.client.start_container(ctx(), &start).await.unwrap();

    let total = mib << 20;
    let began = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = Checksum::default();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = total;
        while left > 0 {
            for word in buf.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap();
            sent.update(&buf[..n]);
            input.write_all(&buf[..n]).await.unwrap();
            left -= n as u64;
        }
        input.shutdown().await.unwrap();
        sent
    });
    let mut received = Checksum::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut pending = Vec::new();
    loop {
        let n = output.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        // Hash whole words only so chunking does not change the result.
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / 8 * 8;
        received.update(&pending[..whole]);
        pending.drain(..whole);
    }
    received.update(&pending);
    let sent = writer.await.unwrap();
    let elapsed = began.elapsed();
    assert_eq!(received.bytes, sent.bytes, "byte count");
    assert_eq!(received.hash, sent.hash, "checksum");
    let mut wait = agent::WaitProcessRequest::new();
    wait.container_id = "pipe".into();
    assert_eq!(
        agent
            .client
            .wait_process(ctx(), &wait)
            .await
            .unwrap()
            .exit_status,
        0
    );
    println!(
        "stdio throughput: {mib} MiB stdin -> cat -> stdout in {:.2} s = {:.1} MiB/s (checksum {:016x})",
        elapsed.as_secs_f64(),
        mib as f64 / elapsed.as_secs_f64(),
        sent.hash
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_1_gib_through_cat_keeps_every_byte_in_order() {
    skip_unless_host_ready!();
    let mib = std::env::var("CLOISTER_STDIO_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    push_through_cat(mib).await;
}

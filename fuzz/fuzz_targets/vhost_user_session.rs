//! The vhost-user path into the core: hostile frontends against unidev's vhost-user
//! server exporting a virtio-rng `LocalVirtio` (memory table into the `DmaSpace`, rings
//! onto the dispatch, inflight and status handling).
//!
//! One server runs for the whole fuzzing process, as a daemon would; each input is one
//! frontend connection. Input: byte 0 (bit 7 clear: a valid feature negotiation comes
//! first), then records `[spec u8][len u16][bytes]` sent with `spec & 3` fds (memfds with
//! fuzzer content, eventfds, pipes); `spec & 0x80` patches the header's size field. Then
//! every eventfd sent is signalled (kicks reach running rings over fuzzer-made memory),
//! the frontend half-closes and reads until the server ends the session. The server must
//! answer or drop the connection, never panic or hang, and serve the next input.
#![no_main]

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use unidev_backends::virtio_rng::{VirtioRng, VIRTIO_ID_RNG};
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::{DispatchOptions, LocalVirtio};
use unidev_fuzz::{drain, fd_kinds, send_with_fds, Input, SentFds};
use unidev_transports::listener;
use unidev_transports::vhost_user::VhostUserServer;

fn server_socket() -> &'static PathBuf {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("unidev-fuzz-vu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("vu.sock");
        let dma = Arc::new(DmaSpace::default());
        let rng = Arc::new(VirtioRng::new().expect("rng"));
        let local = LocalVirtio::new(VIRTIO_ID_RNG, rng, &dma, DispatchOptions::default())
            .expect("local virtio");
        let server = VhostUserServer::new(
            "fuzz-vu",
            listener::bind(&sock, 0o600).expect("bind"),
            local,
            dma,
        )
        .expect("server");
        std::thread::spawn(move || server.run());
        sock
    })
}

fn request(code: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&code.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

fn negotiation() -> Vec<Vec<u8>> {
    const VERSION_1: u64 = 1 << 32;
    const PROTOCOL_FEATURES: u64 = 1 << 30;
    const EVENT_IDX: u64 = 1 << 29;
    // MQ, REPLY_ACK, CONFIG, INFLIGHT_SHMFD, RESET_DEVICE, CONFIGURE_MEM_SLOTS, STATUS.
    let protocol: u64 = 1 | 1 << 3 | 1 << 9 | 1 << 12 | 1 << 13 | 1 << 15 | 1 << 16;
    vec![
        request(3, &[]), // SET_OWNER
        request(1, &[]), // GET_FEATURES
        request(
            2,
            &(VERSION_1 | PROTOCOL_FEATURES | EVENT_IDX).to_le_bytes(),
        ), // SET_FEATURES
        request(15, &[]), // GET_PROTOCOL_FEATURES
        request(16, &protocol.to_le_bytes()), // SET_PROTOCOL_FEATURES
    ]
}

fuzz_target!(|data: &[u8]| {
    let sock = server_socket();
    let mut input = Input::new(data);
    let first = input.u8();
    let client = UnixStream::connect(sock).expect("connect");
    let reader = client.try_clone().expect("clone");
    let drainer = std::thread::spawn(move || drain(&reader));
    let mut sent = SentFds::default();
    if first & 0x80 == 0 {
        for m in negotiation() {
            send_with_fds(&client, &m, &[]);
        }
    }
    while !input.is_empty() {
        let spec = input.u8();
        let len = usize::from(input.u16() % 4096);
        let mut bytes = input.bytes(len).to_vec();
        if spec & 0x80 != 0 && bytes.len() >= 12 {
            let size = ((bytes.len() - 12) as u32).to_le_bytes();
            bytes[8..12].copy_from_slice(&size);
        }
        let kinds = fd_kinds(&mut input, spec);
        let fds = sent.make(&kinds);
        if !send_with_fds(&client, &bytes, &fds) {
            break;
        }
    }
    sent.signal_all();
    let _ = client.shutdown(std::net::Shutdown::Write);
    // The server ends the session at end of stream (or earlier); until then replies flow.
    let _ = drainer.join();
});

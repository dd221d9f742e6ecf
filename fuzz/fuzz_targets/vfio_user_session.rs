//! The vfio-user codec and session state machine against message sequences with fds.
//!
//! Input: byte 0 picks the device (GPIO card, or a virtio-rng virtio-pci function whose
//! queues a worker really runs); then records `[spec u8][len u16][bytes]`, each sent as
//! one write with `spec & 3` fds attached (memfds with fuzzer content, eventfds, pipes).
//! `spec & 0x80` patches the header's size field to the record's length, so the fuzzer
//! can reach payload decoding without learning the framing first; unless byte 0 has bit
//! 7 set, a valid VERSION exchange comes first. The session must answer or drop, never
//! panic or hang; afterwards every kick eventfd is signalled so running queues read
//! fuzzer-made rings.
#![no_main]

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use unidev_backends::gpio::IdioGpioCard;
use unidev_backends::virtio_rng::{VirtioRng, VIRTIO_ID_RNG};
use unidev_core::memory::DmaSpace;
use unidev_core::pci::SharedPciDevice;
use unidev_core::virtio::{DispatchOptions, LocalVirtio, VirtioPci, VirtioPciOptions};
use unidev_fuzz::{drain, fd_kinds, send_with_fds, Input, SentFds};
use unidev_transports::vfio_user::session::{Session, SessionState};
use unidev_transports::vfio_user::socket::{Limits, MessageSocket};
use unidev_transports::vfio_user::ServerConfig;

const VERSION_JSON: &[u8] =
    br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":4096,"migration":{"pgsize":4096}}}"#;

fn version_message() -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&0u16.to_le_bytes()); // major
    payload.extend_from_slice(&2u16.to_le_bytes()); // minor
    payload.extend_from_slice(VERSION_JSON);
    payload.push(0);
    let mut msg = Vec::new();
    msg.extend_from_slice(&0u16.to_le_bytes()); // id
    msg.extend_from_slice(&1u16.to_le_bytes()); // VERSION
    msg.extend_from_slice(&((16 + payload.len()) as u32).to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes()); // flags: command
    msg.extend_from_slice(&0u32.to_le_bytes());
    msg.extend_from_slice(&payload);
    msg
}

fn device(virtio: bool) -> SharedPciDevice {
    let dma = Arc::new(DmaSpace::default());
    if virtio {
        let rng = Arc::new(VirtioRng::new().expect("rng"));
        let local = LocalVirtio::new(VIRTIO_ID_RNG, rng, &dma, DispatchOptions::default())
            .expect("local virtio");
        let pci = VirtioPci::new("fuzz-rng", local, dma, VirtioPciOptions::default())
            .expect("virtio-pci");
        Arc::new(Mutex::new(pci))
    } else {
        Arc::new(Mutex::new(IdioGpioCard::new(dma, 0x5a5a)))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let first = input.u8();
    let config = ServerConfig {
        max_msg_fds: 8,
        max_data_xfer_size: 4096,
        io_timeout: Duration::from_millis(20),
        ..ServerConfig::default()
    };
    let (client, server) = UnixStream::pair().expect("socketpair");
    let limits = Limits {
        max_msg_size: config.max_msg_size(),
        max_fds: config.max_msg_fds,
    };
    let dev = device(first & 1 == 1);
    let mut session = Session::new(
        "fuzz".into(),
        MessageSocket::new(server, limits),
        dev,
        config,
    )
    .expect("session");
    let reader = client.try_clone().expect("clone");
    let drainer = std::thread::spawn(move || drain(&reader));

    let mut sent = SentFds::default();
    if first & 0x80 == 0 {
        send_with_fds(&client, &version_message(), &[]);
    }
    while !input.is_empty() {
        let spec = input.u8();
        let len = usize::from(input.u16() % 8192);
        let mut bytes = input.bytes(len).to_vec();
        if spec & 0x80 != 0 && bytes.len() >= 8 {
            let size = (bytes.len() as u32).to_le_bytes();
            bytes[4..8].copy_from_slice(&size);
        }
        let kinds = fd_kinds(&mut input, spec);
        let fds = sent.make(&kinds);
        if !send_with_fds(&client, &bytes, &fds) {
            break;
        }
    }
    sent.signal_all();
    let _ = client.shutdown(std::net::Shutdown::Write);
    while session.serve_one() == SessionState::Open {}
    session.close();
    drop(session);
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = drainer.join();
});

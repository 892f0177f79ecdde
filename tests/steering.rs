//! The reuseport steering program really steers: a short-header QUIC packet whose
//! connection id names core k arrives on socket k of the group, whatever the sender's
//! address; handshake packets fall back to the kernel's hash.

use std::net::UdpSocket;
use std::time::Duration;

use weir::shell::quic::bind_sockets;

fn receiver_of(sockets: &[UdpSocket], payload: &[u8], from: &UdpSocket) -> usize {
    from.send_to(payload, sockets[0].local_addr().unwrap()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut buffer = [0u8; 64];
    loop {
        for (index, socket) in sockets.iter().enumerate() {
            if let Ok((length, _)) = socket.recv_from(&mut buffer) {
                assert_eq!(&buffer[..length], payload);
                return index;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no socket received the datagram");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn short_header_packets_land_on_the_core_named_in_their_connection_id() {
    let sockets = bind_sockets("127.0.0.1:0".parse().unwrap(), 4).unwrap();
    // Many source ports (as after NAT rebinding): the destination core never changes.
    for attempt in 0..40u32 {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let core = attempt % 4;
        let mut packet = vec![0x40u8];
        packet.extend_from_slice(&core.to_be_bytes());
        packet.extend_from_slice(&attempt.to_be_bytes());
        assert_eq!(receiver_of(&sockets, &packet, &client), core as usize, "attempt {attempt}");
    }
    // Long headers and unknown cores still arrive somewhere.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let long_header = [0xc0u8, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8];
    assert!(receiver_of(&sockets, &long_header, &client) < 4);
    let unknown_core = [0x40u8, 0, 0, 0, 9, 1, 1, 1, 1];
    assert!(receiver_of(&sockets, &unknown_core, &client) < 4);
}

//! iroh on loopback, offline: two endpoints connect by id + address, a wire frame of a hidden
//! state crosses a QUIC stream intact, and the node key persists across restarts.

use candle_core::{Device, Tensor};
use neuroshard_core::net::endpoint::{bind, dial_addr, load_or_create_key, EndpointOptions};
use neuroshard_core::wire::{read_frame, write_frame, Codec, FrameMeta};
use std::time::Duration;

const ALPN: &[u8] = b"neuroshard/test/1";

#[tokio::test]
async fn a_frame_crosses_an_offline_loopback_connection() {
    let opts = EndpointOptions {
        alpns: vec![ALPN.to_vec()],
        ..EndpointOptions::default()
    };
    let server = bind(iroh::SecretKey::generate(), &opts)
        .await
        .expect("server");
    let client = bind(iroh::SecretKey::generate(), &EndpointOptions::default())
        .await
        .expect("client");
    let addr = dial_addr(&server);
    assert!(
        addr.ip_addrs().all(|a| a.ip().is_loopback()),
        "binds loopback only: {addr:?}"
    );
    let hidden = Tensor::from_vec(
        (0..576 * 3).map(|i| i as f32 * 0.01).collect::<Vec<_>>(),
        (1, 3, 576),
        &Device::Cpu,
    )
    .expect("t");
    let expected_client = client.id();
    let echo = tokio::spawn(async move {
        let incoming = server.accept().await.expect("incoming");
        let conn = incoming.await.expect("handshake");
        assert_eq!(
            conn.remote_id(),
            expected_client,
            "iroh authenticates the peer"
        );
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let frame = read_frame(&mut recv, 1 << 20).await.expect("read");
        let t = frame.as_frame().to_tensor().expect("tensor");
        write_frame(
            &mut send,
            &t,
            Codec::F32,
            FrameMeta {
                session: 1,
                position: 9,
            },
            false,
        )
        .await
        .expect("write");
        send.finish().expect("finish");
        conn.closed().await;
        server.close().await;
    });
    let conn = tokio::time::timeout(Duration::from_secs(10), client.connect(addr, ALPN))
        .await
        .expect("connect in time")
        .expect("connect");
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    write_frame(
        &mut send,
        &hidden,
        Codec::F16,
        FrameMeta {
            session: 1,
            position: 9,
        },
        false,
    )
    .await
    .expect("write");
    send.finish().expect("finish");
    let back = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv, 1 << 20))
        .await
        .expect("reply in time")
        .expect("read");
    let t = back.as_frame().to_tensor().expect("tensor");
    let want = hidden
        .to_dtype(candle_core::DType::F16)
        .expect("f16")
        .to_dtype(candle_core::DType::F32)
        .expect("f32");
    let diff = (t - want)
        .expect("sub")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("s");
    assert_eq!(
        diff, 0.0,
        "f16 round trip over QUIC is exactly the f16 rounding"
    );
    conn.close(0u32.into(), b"done");
    tokio::time::timeout(Duration::from_secs(10), echo)
        .await
        .expect("server done")
        .expect("server ok");
    client.close().await;
}

#[test]
fn node_key_persists_across_restarts() {
    let dir = std::env::temp_dir().join(format!("neuroshard-key-{}", std::process::id()));
    let path = dir.join("node.key");
    let first = load_or_create_key(&path).expect("create");
    let again = load_or_create_key(&path).expect("load");
    assert_eq!(first.public(), again.public());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key file is private");
    }
    std::fs::write(&path, "not a key").expect("write");
    assert!(load_or_create_key(&path).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

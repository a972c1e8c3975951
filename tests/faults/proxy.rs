//! The fault-injection proxy itself: it forwards bytes unchanged and in
//! order, a stall holds them until `restore`, and a cut resets live
//! connections and refuses new ones until `restore`. Positive waits get
//! generous timeouts; only "nothing arrived yet" uses a short one.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use crate::support::proxy::Proxy;

/// How long anything that should happen may take.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long a stall is watched to show nothing gets through.
const QUIET: Duration = Duration::from_millis(300);

/// An upstream that echoes every connection back, for as long as the test runs.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    address
}

async fn proxy_to(upstream: SocketAddr) -> Proxy {
    Proxy::start("127.0.0.1:0", &upstream.to_string()).await
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Waits until `condition` holds, polling; panics after `PATIENCE`.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

async fn connect(proxy: &Proxy) -> TcpStream {
    within("connect", TcpStream::connect(proxy.local_addr()))
        .await
        .expect("connect to the proxy")
}

/// Sends `message` and expects it echoed back whole.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.expect("write");
    let mut echoed = vec![0; message.len()];
    within("echo", stream.read_exact(&mut echoed))
        .await
        .expect("read the echo");
    assert_eq!(echoed, message);
}

/// Asserts the connection ends soon: end of stream or an error (a reset),
/// never data.
async fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut buffer = [0; 64];
    match within(what, stream.read(&mut buffer)).await {
        Ok(0) | Err(_) => {}
        Ok(read) => panic!("{what}: expected the connection closed, read {read} bytes"),
    }
}

/// Asserts nothing arrives within `QUIET`.
async fn assert_quiet(stream: &mut TcpStream, what: &str) {
    let mut buffer = [0; 64];
    if let Ok(result) = timeout(QUIET, stream.read(&mut buffer)).await {
        panic!("{what}: expected nothing during the stall, got {result:?}");
    }
}

/// A connection through the proxy is either refused at connect or closed
/// right after: nothing is ever echoed.
async fn assert_refused(proxy: &Proxy) {
    match timeout(PATIENCE, TcpStream::connect(proxy.local_addr())).await {
        Ok(Err(_)) => {}
        Ok(Ok(mut stream)) => {
            // The write may already fail if the reset arrived.
            let _: io::Result<()> = stream.write_all(b"anyone?").await;
            assert_closed(&mut stream, "a connection made during the cut").await;
        }
        Err(_) => panic!("timed out connecting during the cut"),
    }
}

#[tokio::test]
async fn forwards_bytes_unchanged_and_in_order() {
    let proxy = proxy_to(echo_server().await).await;
    let mut stream = connect(&proxy).await;
    round_trip(&mut stream, b"hello").await;

    // More than the socket buffers hold, so it really streams: write from
    // one task while this one reads.
    let mut payload = vec![0; 4 << 20];
    rand::rng().fill_bytes(&mut payload);
    let (mut read, mut write) = stream.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.expect("write the payload");
        write.shutdown().await.expect("half-close");
    });
    let mut echoed = Vec::new();
    within("the payload echoed", read.read_to_end(&mut echoed))
        .await
        .expect("read the payload");
    writer.await.unwrap();
    assert!(echoed == payload, "the payload came back changed");
}

#[tokio::test]
async fn a_stall_holds_bytes_until_restore() {
    let proxy = proxy_to(echo_server().await).await;
    let mut live = connect(&proxy).await;
    round_trip(&mut live, b"before").await;

    proxy.stall();
    live.write_all(b"held").await.unwrap();
    assert_quiet(&mut live, "a live connection").await;
    // A new connection is accepted but held the same way.
    let mut new = connect(&proxy).await;
    new.write_all(b"also held").await.unwrap();
    assert_quiet(&mut new, "a new connection").await;

    proxy.restore();
    let mut held = [0; 4];
    within("held bytes", live.read_exact(&mut held))
        .await
        .unwrap();
    assert_eq!(&held, b"held");
    let mut held = [0; 9];
    within("held bytes", new.read_exact(&mut held))
        .await
        .unwrap();
    assert_eq!(&held, b"also held");
    round_trip(&mut live, b"after").await;
    assert_eq!(proxy.open_connections(), 2);
}

#[tokio::test]
async fn a_cut_resets_both_sides_and_refuses_until_restore() {
    // An upstream the test holds, to see that side close as well.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy_to(upstream.local_addr().unwrap()).await;
    let mut client = connect(&proxy).await;
    let (mut server, _) = within("upstream accept", upstream.accept()).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut ping = [0; 4];
    within("ping", server.read_exact(&mut ping)).await.unwrap();
    assert_eq!(&ping, b"ping");

    proxy.cut();
    assert_closed(&mut client, "the client side").await;
    assert_closed(&mut server, "the upstream side").await;
    eventually("no open connections", || proxy.open_connections() == 0).await;
    assert_refused(&proxy).await;
    assert_eq!(proxy.accepted(), 1, "a refused connection is not counted");

    proxy.restore();
    let mut client = connect(&proxy).await;
    let (mut server, _) = within("upstream accept", upstream.accept()).await.unwrap();
    server.write_all(b"pong").await.unwrap();
    let mut pong = [0; 4];
    within("pong", client.read_exact(&mut pong)).await.unwrap();
    assert_eq!(&pong, b"pong");
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test]
async fn a_cut_ends_live_connections_even_when_restored_at_once() {
    let proxy = proxy_to(echo_server().await).await;
    let mut stream = connect(&proxy).await;
    round_trip(&mut stream, b"before").await;

    proxy.cut();
    proxy.restore();
    assert_closed(&mut stream, "the connection live at the cut").await;
    let mut again = connect(&proxy).await;
    round_trip(&mut again, b"after").await;
}

#[tokio::test]
async fn a_cut_ends_stalled_connections() {
    let proxy = proxy_to(echo_server().await).await;
    let mut stream = connect(&proxy).await;
    round_trip(&mut stream, b"before").await;

    proxy.stall();
    stream.write_all(b"held").await.unwrap();
    assert_quiet(&mut stream, "the stalled connection").await;
    proxy.cut();
    assert_closed(&mut stream, "the stalled connection").await;
}

#[tokio::test]
async fn counts_open_and_accepted_connections() {
    let proxy = proxy_to(echo_server().await).await;
    assert_eq!((proxy.open_connections(), proxy.accepted()), (0, 0));

    let mut first = connect(&proxy).await;
    round_trip(&mut first, b"one").await;
    let mut second = connect(&proxy).await;
    round_trip(&mut second, b"two").await;
    assert_eq!((proxy.open_connections(), proxy.accepted()), (2, 2));

    // An orderly close from the client ends the connection through the
    // proxy: the echo server closes in turn.
    first.shutdown().await.unwrap();
    assert_closed(&mut first, "the first connection").await;
    drop(first);
    eventually("one open connection", || proxy.open_connections() == 1).await;
    drop(second);
    eventually("no open connections", || proxy.open_connections() == 0).await;
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test]
async fn an_unreachable_upstream_closes_the_client() {
    // A port nobody listens on any more.
    let gone = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = proxy_to(gone).await;
    let mut stream = connect(&proxy).await;
    assert_closed(&mut stream, "a connection with no upstream").await;
    assert_eq!((proxy.open_connections(), proxy.accepted()), (0, 0));
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections() {
    let proxy = proxy_to(echo_server().await).await;
    let mut stream = connect(&proxy).await;
    round_trip(&mut stream, b"before").await;

    drop(proxy);
    assert_closed(&mut stream, "a connection of a dropped proxy").await;
}

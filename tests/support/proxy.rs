//! A TCP proxy for fault injection, put between the relay and PostgreSQL or
//! Kafka. Invariant: bytes are forwarded unchanged and in order unless a
//! fault is active; a stall holds bytes back (never drops them) until
//! `restore`; a cut resets every connection that was live when it began,
//! even if `restore` follows at once, and refuses new ones until `restore`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Forwarding,
    Stalled,
    Cut,
}

/// The state plus how many cuts have begun. A connection remembers the count
/// it was accepted under, so `cut(); restore();` still ends it even when its
/// task never got to observe the `Cut` state in between.
#[derive(Debug, Clone, Copy)]
struct Control {
    state: State,
    cuts: u64,
}

/// What the accept loop and every connection share with the `Proxy` handle.
struct Shared {
    control: watch::Sender<Control>,
    open: AtomicUsize,
    accepted: AtomicUsize,
    /// Where new connections go ("host:port"); `switch_to` changes it.
    upstream: std::sync::Mutex<String>,
}

/// A TCP proxy from a local listening address to one upstream `host:port`,
/// whose traffic tests can stall and cut.
pub struct Proxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept_loop: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (e.g. "127.0.0.1:0" or a fixed "127.0.0.1:PORT")
    /// and forwards every accepted connection to `upstream` ("host:port",
    /// resolved again for each connection). Panics if it cannot listen.
    pub async fn start(listen: &str, upstream: &str) -> Proxy {
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|error| panic!("proxy cannot listen on {listen}: {error}"));
        let local_addr = listener.local_addr().expect("proxy listener address");
        let (control, _) = watch::channel(Control {
            state: State::Forwarding,
            cuts: 0,
        });
        let shared = Arc::new(Shared {
            control,
            open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            upstream: std::sync::Mutex::new(upstream.to_owned()),
        });
        let accept_loop = tokio::spawn(accept_loop(listener, shared.clone()));
        Proxy {
            local_addr,
            shared,
            accept_loop,
        }
    }

    /// The address it listens on (the resolved port when port 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Closes every live connection at once with a reset on both sides, as a
    /// network failure would, and refuses new ones (accepts, then resets
    /// them at once) until `restore`.
    pub fn cut(&self) {
        self.shared.control.send_modify(|control| {
            control.state = State::Cut;
            control.cuts += 1;
        });
    }

    /// Stops forwarding bytes in both directions on every live and new
    /// connection until `restore`. Connections stay open; the bytes are held
    /// back, not dropped.
    pub fn stall(&self) {
        self.shared
            .control
            .send_modify(|control| control.state = State::Stalled);
    }

    /// Ends a cut or a stall: new connections are forwarded again and held
    /// bytes flow.
    pub fn restore(&self) {
        self.shared
            .control
            .send_modify(|control| control.state = State::Forwarding);
    }

    /// Sends new connections to `upstream` ("host:port") from now on and
    /// resets every live one, as a load balancer in front of a Postgres
    /// cluster does when the primary fails over (HAProxy on Patroni's health
    /// check, with `on-marked-down shutdown-sessions`).
    pub fn switch_to(&self, upstream: &str) {
        *self.shared.upstream.lock().expect("proxy upstream") = upstream.to_owned();
        self.cut();
        self.restore();
    }

    /// Number of connections currently open through the proxy (for tests to
    /// wait until the client has reconnected).
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Total connections accepted and forwarded (upstream connected) since
    /// start; connections refused during a cut are not counted.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    /// Stops the listener task and resets every live connection. The
    /// listening socket is released once the runtime drops the aborted task.
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(error) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::debug!(%error, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Read the control now, not in the task: a cut that begins before the
        // task first runs must still end this connection.
        let now = *shared.control.borrow();
        if now.state == State::Cut {
            reset(client);
            continue;
        }
        let upstream = shared.upstream.lock().expect("proxy upstream").clone();
        tokio::spawn(serve(client, upstream, shared.clone(), now.cuts));
    }
}

/// Forwards one connection until both directions end, one fails, or a cut.
async fn serve(mut client: TcpStream, upstream: String, shared: Arc<Shared>, cuts: u64) {
    let control = shared.control.subscribe();
    let connected = tokio::select! {
        biased;
        _ = cut_after(control.clone(), cuts) => None,
        connected = TcpStream::connect(&upstream) => connected
            .inspect_err(|error| tracing::debug!(%error, upstream, "proxy upstream connect failed"))
            .ok(),
    };
    let Some(mut upstream) = connected else {
        reset(client);
        return;
    };
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    shared.open.fetch_add(1, Ordering::SeqCst);
    // Decrements `open` however this task ends, including when aborted.
    let _open = OpenGuard(shared.clone());

    let orderly = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let forward = async {
            tokio::try_join!(
                pump(client_read, upstream_write, control.clone()),
                pump(upstream_read, client_write, control.clone()),
            )
        };
        // Biased so a cut wins over a chunk that became writable in the same
        // poll; dropping `forward` also ends a pump blocked in read or stall.
        tokio::select! {
            biased;
            _ = cut_after(control.clone(), cuts) => false,
            forwarded = forward => forwarded.is_ok(),
        }
    };
    if orderly {
        // Both directions already passed their FIN on.
        drop((client, upstream));
    } else {
        // A cut, or an error on one side (e.g. a reset) that the other side
        // should see as a failure too, not as an orderly close.
        reset(client);
        reset(upstream);
    }
    // `_open` drops last, so once the count falls both sockets are closed.
}

/// Copies `from` to `to` chunk by chunk, holding each chunk while the proxy
/// is not forwarding. On end of stream it passes the half-close on (FIN), so
/// protocols that shut down one direction keep working. An error ends the
/// whole connection (through `try_join!`).
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut control: watch::Receiver<Control>,
) -> std::io::Result<()> {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await?;
        // Hold the chunk (or the FIN) while stalled. During a cut this waits
        // forever; `serve` drops it and resets both sockets.
        if control
            .wait_for(|control| control.state == State::Forwarding)
            .await
            .is_err()
        {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        if read == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..read]).await?;
    }
}

/// Resolves once a cut began after the one numbered `cuts`, or the proxy is gone.
async fn cut_after(mut control: watch::Receiver<Control>, cuts: u64) {
    // An error means every sender is gone, which also ends the connection.
    let _ = control
        .wait_for(|control| control.state == State::Cut || control.cuts != cuts)
        .await;
}

/// Closes with SO_LINGER 0, so the peer gets a RST (a network failure),
/// not a FIN (an orderly close).
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

//! The baseline: a bare WebSocket forwarder on the relay's own stack (tokio,
//! tokio-tungstenite, the relay's WebSocket settings) with no
//! authentication, no protobuf and no registry beyond a map from pair to
//! socket. B connects to `/b/<pair>`, A to `/a/<pair>`, and every frame A
//! sends is written to B as is. It is what the machine can do at all, so
//! relay throughput is quoted as a ratio to it, measured in the same run.
//!
//! For the answered baseline B acks what it received in batches, a 16-byte
//! record per message, and the forwarder answers each record to A in its
//! own frame: the relay's frames per message (send, delivery, a share of a
//! batched ack, the sender's answer) with none of its work.
//!
//! Its shape mirrors the relay's so the ratio prices the relay's work, not a
//! different architecture: the relay's read-ahead under each socket, a
//! reader per socket, a bounded queue per socket, and a writer that
//! batches whatever is queued into one flush (the client library's own
//! [`write_batched`], which the baselines' raw clients use too).

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use signal_relay::client::write_batched;
use signal_relay::connection::read_ahead::ReadAhead;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Inboxes = Arc<Mutex<HashMap<u64, mpsc::Sender<Message>>>>;

/// The relay's default per-connection queue (RELAY_OUTBOUND_QUEUE).
const QUEUE: usize = 256;

/// One acked message in a frame from B: the generator's payload header.
const ACK_RECORD: usize = 16;

/// Serves until killed. Prints `listening ADDR` once bound.
/// `write_buffer` overrides the relay's WebSocket write buffer (0: every
/// frame is written to the socket as soon as it is fed), to try the effect
/// of write batching without touching the relay.
pub async fn run(listen: SocketAddr, write_buffer: Option<usize>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let inboxes: Inboxes = Arc::default();
    let limits = signal_relay::Config::for_tests("postgres://unused")
        .limits
        .connection;
    let mut config = signal_relay::server::websocket_config(&limits);
    if let Some(bytes) = write_buffer {
        config = config.write_buffer_size(bytes);
    }
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(serve(
            stream,
            inboxes.clone(),
            config,
            limits.read_ahead_bytes,
        ));
    }
}

async fn serve(stream: TcpStream, inboxes: Inboxes, config: WebSocketConfig, read_ahead: usize) {
    let _ = stream.set_nodelay(true);
    let stream = ReadAhead::new(stream, read_ahead);
    let mut path = String::new();
    // The signature is tungstenite's; its error type is not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        path = request.uri().path().to_owned();
        Ok(response)
    };
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let mut parts = path.trim_start_matches('/').split('/');
    let (Some(role), Some(Ok(pair))) = (parts.next(), parts.next().map(str::parse::<u64>)) else {
        return;
    };
    let is_b = match role {
        "a" => false,
        "b" => true,
        _ => return,
    };
    let me = inbox_key(pair, is_b);
    let peer = me ^ 1;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE);
    inboxes.lock().expect("inboxes lock").insert(me, tx);
    let writer = write_batched(&mut sink, &mut rx);
    // The peer's inbox is looked up at the first frame and kept: B connects
    // before A, and answers only once A has sent.
    let reader = async {
        let mut to_peer: Option<mpsc::Sender<Message>> = None;
        while let Some(Ok(message)) = stream.next().await {
            if !matches!(message, Message::Binary(_)) {
                continue;
            }
            if to_peer.is_none() {
                to_peer = inboxes.lock().expect("inboxes lock").get(&peer).cloned();
            }
            let Some(tx) = &to_peer else { break };
            if let (true, Message::Binary(acks)) = (is_b, &message) {
                // B's frames are batched acks of 16-byte records; like the
                // relay, answer each acked message to A in its own frame.
                for at in (0..acks.len()).step_by(ACK_RECORD) {
                    let record = acks.slice(at..(at + ACK_RECORD).min(acks.len()));
                    if tx.send(Message::Binary(record)).await.is_err() {
                        return;
                    }
                }
            } else if tx.send(message).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    inboxes.lock().expect("inboxes lock").remove(&me);
}

/// A's inbox and B's of one pair differ in the lowest bit.
fn inbox_key(pair: u64, b: bool) -> u64 {
    pair << 1 | u64::from(b)
}

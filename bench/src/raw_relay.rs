//! A relay client on bare sockets, for `live --raw-client`: the frames
//! `signal_relay::client` writes and reads, encoded and decoded with the
//! same prost types, and none of the library's machinery (no reader task,
//! request table, oneshot, event channel or per-request future). What the
//! generator spends per message with the library over what it spends with
//! this is the library's own cost, which issue #16 asks to keep within 2×
//! of raw sockets sending the same frames.
//!
//! With no table, the answers are matched through their request ids: a
//! send's id is the time the message was meant to be sent (what its
//! latency is measured from), and an ack's id is how many ids it carries
//! (what its answer is checked against). The relay only echoes request ids.
//! (A send's id so takes 5 bytes more than the library's counter: noise
//! beside the 256-byte payload.)

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{FutureExt, SinkExt, StreamExt};
use prost::Message as _;
use signal_relay::proto::{
    self, ClientFrame, EnvelopeType, SendOutcome, ServerFrame, Status, client_frame::Request, push,
    response, server_frame,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::metrics::{Kind, Metrics};
use crate::payload::intended_of;
use crate::seed::Account;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Sink = SplitSink<Socket, WsMessage>;
pub type Stream = SplitStream<Socket>;

/// The request id of the `Resume` that authenticates the socket; any id
/// would do, since nothing else is in flight then.
const RESUME_ID: u64 = 1;

/// Connects to the relay at `url` and authenticates with the account's
/// session token, as the client library does (same socket settings).
/// Returns once the relay has answered the resume and said the stored
/// queue is empty, so live messages to this socket are delivered live.
pub async fn connect(url: &str, account: &Account) -> anyhow::Result<(Sink, Stream)> {
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .with_context(|| format!("connect to {url}"))?;
    let (mut sink, mut stream) = ws.split();
    let resume = ClientFrame {
        request_id: RESUME_ID,
        request: Some(Request::Resume(proto::Resume {
            token: Bytes::copy_from_slice(&account.token),
        })),
    };
    sink.send(binary(&resume)).await.context("send resume")?;
    let (mut resumed, mut empty) = (false, false);
    while !(resumed && empty) {
        let Some(message) = stream.next().await else {
            bail!("the relay closed the socket before the resume was answered");
        };
        let WsMessage::Binary(bytes) = message.context("read")? else {
            continue;
        };
        match ServerFrame::decode(bytes)
            .context("decode a server frame")?
            .kind
        {
            Some(server_frame::Kind::Response(r)) if r.request_id == RESUME_ID => {
                if r.status != Status::Ok as i32 {
                    bail!("resume refused: {}", r.message);
                }
                resumed = true;
            }
            Some(server_frame::Kind::Push(proto::Push {
                event: Some(push::Event::QueueEmpty(_)),
            })) => empty = true,
            _ => {}
        }
    }
    Ok((sink, stream))
}

/// The `SendMessage` frame of one message to `recipient`, its request id
/// the time it was meant to be sent.
pub fn send_frame(recipient: &Bytes, content: Bytes, intended: u64) -> WsMessage {
    binary(&ClientFrame {
        request_id: intended,
        request: Some(Request::SendMessage(proto::SendMessage {
            recipient_id: recipient.clone(),
            r#type: EnvelopeType::Ciphertext as i32,
            content,
            ..Default::default()
        })),
    })
}

/// A user id as the relay's frames carry it.
pub fn user_id(id: Uuid) -> Bytes {
    Bytes::copy_from_slice(id.as_bytes())
}

fn binary(frame: &ClientFrame) -> WsMessage {
    WsMessage::Binary(frame.encode_to_vec().into())
}

/// The sender's reading half: each answer completes its message. Returns
/// when the socket ends.
pub async fn receive_answers(
    mut stream: Stream,
    window: Option<&tokio::sync::Semaphore>,
    metrics: &Metrics,
) {
    while let Some(Ok(message)) = stream.next().await {
        let WsMessage::Binary(bytes) = message else {
            continue;
        };
        let response = match ServerFrame::decode(bytes).map(|f| f.kind) {
            Ok(Some(server_frame::Kind::Response(r))) => r,
            // The sender's own queue-empty push, and nothing else.
            Ok(_) => continue,
            Err(e) => {
                metrics.error(format!("decode a server frame: {e}"));
                break;
            }
        };
        match send_outcome(&response) {
            Ok(SendOutcome::Delivered) => metrics.record_since(Kind::Answer, response.request_id),
            Ok(other) => {
                metrics.record_since(Kind::Answer, response.request_id);
                metrics.error(format!("answer {other:?} instead of Delivered"));
            }
            Err(e) => metrics.error(format!("send: {e}")),
        }
        if let Some(w) = window {
            w.add_permits(1);
        }
    }
}

fn send_outcome(response: &proto::Response) -> Result<SendOutcome, String> {
    match &response.result {
        Some(response::Result::Send(sent)) if response.status == Status::Ok as i32 => {
            Ok(SendOutcome::try_from(sent.outcome).unwrap_or(SendOutcome::Unspecified))
        }
        _ => Err(format!("status {} ({})", response.status, response.message)),
    }
}

/// The recipient: records each delivery's latency and acks whatever
/// arrived together in one request of at most `max_ids`, as the library's
/// receiver in `live` does. Returns when the socket ends or its writer is
/// gone.
pub async fn receive_deliveries(
    mut stream: Stream,
    acks: &mpsc::Sender<WsMessage>,
    max_ids: usize,
    metrics: &Metrics,
) {
    let mut ids: Vec<Bytes> = Vec::new();
    while let Some(Ok(mut message)) = stream.next().await {
        loop {
            if let WsMessage::Binary(bytes) = &message {
                match ServerFrame::decode(bytes.clone()).map(|f| f.kind) {
                    Ok(Some(server_frame::Kind::Push(proto::Push {
                        event: Some(push::Event::Deliver(envelope)),
                    }))) => {
                        if envelope.r#type == EnvelopeType::Receipt as i32 {
                            metrics.count("receipts", 1);
                        } else if let Some(intended) = intended_of(&envelope.content) {
                            metrics.record_since(Kind::Delivery, intended);
                        }
                        ids.push(envelope.message_id);
                    }
                    Ok(Some(server_frame::Kind::Response(r))) => check_ack(metrics, &r),
                    Ok(_) => {}
                    Err(e) => metrics.error(format!("decode a server frame: {e}")),
                }
            }
            if ids.len() >= max_ids {
                break;
            }
            match stream.next().now_or_never() {
                Some(Some(Ok(next))) => message = next,
                _ => break,
            }
        }
        if !ids.is_empty() {
            let frame = ClientFrame {
                request_id: ids.len() as u64,
                request: Some(Request::AckMessages(proto::AckMessages {
                    message_ids: std::mem::take(&mut ids),
                })),
            };
            if acks.send(binary(&frame)).await.is_err() {
                metrics.error("ack: the writer is gone".to_string());
                break;
            }
        }
    }
}

/// An ack's answer: every id it carried (its request id) acked.
fn check_ack(metrics: &Metrics, response: &proto::Response) {
    match &response.result {
        Some(response::Result::Ack(acks)) if response.status == Status::Ok as i32 => {
            metrics.count("acked", acks.acked.len() as u64);
            if !acks.unknown.is_empty() || acks.acked.len() as u64 != response.request_id {
                metrics.error(format!(
                    "ack: {} of {} ids acked, {} unknown",
                    acks.acked.len(),
                    response.request_id,
                    acks.unknown.len()
                ));
            }
        }
        _ => metrics.error(format!(
            "ack: status {} ({})",
            response.status, response.message
        )),
    }
}

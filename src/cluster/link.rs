//! A Redis connection driven by the task that uses it.
//!
//! redis-rs runs each multiplexed connection on a task of its own: every
//! command then crosses two tasks (the caller's and the connection's) each
//! way, and on a cluster node under load those wake-ups, not Redis, were
//! most of the cost of a cross-node message (BENCHMARKS.md, 2026-12-03
//! late). The inbox reader and each outbox writer use their connection
//! alone and one command at a time, so here the connection's driver is
//! polled inside the caller's own task, and a reply wakes only it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue, RedisError,
    RedisResult,
};
use tokio::io::{AsyncRead, AsyncWrite};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// One connection to Redis and what drives it.
pub(super) struct Link {
    /// The handle commands are sent through.
    conn: MultiplexedConnection,
    /// Reads and writes the socket; polled only while a command is awaited
    /// (nothing else is in flight in between). Ends when the socket does.
    driver: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The driver has ended: the socket is closed, and so is this link.
    closed: bool,
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Socket for T {}

impl Link {
    /// Connects (TCP with `TCP_NODELAY`, or a Unix socket) and runs the
    /// handshake (authentication, database). A command waits for its reply
    /// at most `response_timeout`.
    pub async fn open(info: &ConnectionInfo, response_timeout: Duration) -> RedisResult<Link> {
        let connect = async {
            let socket: Box<dyn Socket> = match info.addr() {
                ConnectionAddr::Tcp(host, port) => {
                    let socket = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    // Nagle's algorithm would hold a small write until the
                    // previous one is acknowledged.
                    socket.set_nodelay(true)?;
                    Box::new(socket)
                }
                #[cfg(unix)]
                ConnectionAddr::Unix(path) => {
                    Box::new(tokio::net::UnixStream::connect(path).await?)
                }
                _ => {
                    return Err(RedisError::from((
                        ErrorKind::InvalidClientConfig,
                        "only redis:// and redis+unix:// addresses are supported",
                    )));
                }
            };
            let config = AsyncConnectionConfig::new().set_response_timeout(Some(response_timeout));
            let (conn, driver) =
                MultiplexedConnection::new_with_config(info.redis_settings(), socket, config)
                    .await?;
            Ok(Link {
                conn,
                driver: Box::pin(driver),
                closed: false,
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from((
                    ErrorKind::Io,
                    "connecting to Redis timed out",
                )))
            })
    }

    /// Sends one command and waits for its reply.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        let reply = cmd.query_async::<T>(&mut self.conn);
        Self::drive(&mut self.driver, &mut self.closed, reply).await
    }

    /// Sends a pipeline and waits for its replies.
    pub async fn query_pipe<T: FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> RedisResult<T> {
        let reply = pipe.query_async::<T>(&mut self.conn);
        Self::drive(&mut self.driver, &mut self.closed, reply).await
    }

    /// Polls the driver first, so that a reply it reads completes `reply`
    /// in the same wake-up.
    async fn drive<T>(
        driver: &mut Pin<Box<dyn Future<Output = ()> + Send>>,
        closed: &mut bool,
        reply: impl Future<Output = RedisResult<T>>,
    ) -> RedisResult<T> {
        let gone = || RedisError::from((ErrorKind::Io, "the connection to Redis closed"));
        if *closed {
            return Err(gone());
        }
        let mut reply = std::pin::pin!(reply);
        tokio::select! {
            biased;
            () = driver.as_mut() => {
                *closed = true;
                // Its last read may have completed this reply.
                futures::FutureExt::now_or_never(reply.as_mut()).unwrap_or_else(|| Err(gone()))
            }
            reply = reply.as_mut() => reply,
        }
    }
}

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

    /// Whether the socket has closed, found without waiting: the driver,
    /// polled only while a command is awaited, is polled once. An idle
    /// link whose server closed it (a Redis restart, `CLIENT KILL`, an idle
    /// timeout) is found closed here, before a command is lost on it.
    pub fn is_closed(&mut self) -> bool {
        if !self.closed && futures::FutureExt::now_or_never(self.driver.as_mut()).is_some() {
            self.closed = true;
        }
        self.closed
    }

    /// Whether a command that failed with `err` left this link usable: an
    /// error Redis itself answered does (out of memory, read-only replica);
    /// anything else (I/O, a timeout, a reply that could not be read) may
    /// have left it half used, and it is dropped.
    pub fn survives(err: &RedisError) -> bool {
        matches!(err.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redis::IntoConnectionInfo;
    use tokio::time::Instant;

    use super::Link;

    const WAIT: Duration = Duration::from_secs(10);

    /// A `redis-server` of the test's own on a free port, gone with it.
    async fn private_redis() -> (tokio::process::Child, redis::ConnectionInfo) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .expect("a free port")
            .port();
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server (is it installed?)");
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let info = format!("redis://127.0.0.1:{port}/0")
            .into_connection_info()
            .expect("a valid URL");
        (child, info)
    }

    /// An idle link's driver is not polled, so it cannot notice on its own
    /// that Redis closed it; `is_closed` must, before a command goes out
    /// on the dead socket and is lost.
    #[tokio::test]
    async fn a_link_the_server_closed_is_found_closed_before_use() {
        let (_redis, info) = private_redis().await;
        let mut link = Link::open(&info, WAIT).await.expect("connect");
        let id: i64 = link.query(redis::cmd("CLIENT").arg("ID")).await.unwrap();
        assert!(!link.is_closed(), "open and idle");
        let mut other = Link::open(&info, WAIT).await.expect("connect");
        let killed: i64 = other
            .query(redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id))
            .await
            .unwrap();
        assert_eq!(killed, 1);
        // The close reaches the socket when the kernel delivers it.
        let deadline = Instant::now() + WAIT;
        while !link.is_closed() {
            assert!(Instant::now() < deadline, "the closed link was not noticed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let after: redis::RedisResult<String> = link.query(&redis::cmd("PING")).await;
        assert!(after.is_err(), "a closed link refuses commands at once");
        let pong: String = other.query(&redis::cmd("PING")).await.unwrap();
        assert_eq!(pong, "PONG");
    }

    /// An error Redis answers leaves the connection as it was; one that
    /// never reached Redis does not.
    #[tokio::test]
    async fn only_errors_redis_answered_leave_a_link_usable() {
        let (_redis, info) = private_redis().await;
        let mut link = Link::open(&info, WAIT).await.expect("connect");
        let _: () = link
            .query(redis::cmd("SET").arg("k").arg("v"))
            .await
            .unwrap();
        let wrong: redis::RedisResult<String> = link
            .query(redis::cmd("XADD").arg("k").arg("*").arg("f").arg("v"))
            .await;
        let wrong = wrong.expect_err("XADD to a string key");
        assert!(Link::survives(&wrong), "{wrong}");
        assert!(!link.is_closed());
        let pong: String = link.query(&redis::cmd("PING")).await.unwrap();
        assert_eq!(pong, "PONG");

        let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .unwrap()
            .port();
        let nowhere = format!("redis://127.0.0.1:{closed_port}/0")
            .into_connection_info()
            .unwrap();
        let refused = Link::open(&nowhere, WAIT)
            .await
            .err()
            .expect("nothing listens");
        assert!(!Link::survives(&refused), "{refused}");
    }
}

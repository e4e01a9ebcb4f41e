//! A minimal client of a server-sent-event stream over plain HTTP/1.1, for the console's tests
//! and its fan-out harness: opens `GET path` with a cookie and yields each event's name and
//! data as it arrives.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head read, in bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Largest event kept unparsed, in bytes; a longer one is an error.
const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;

/// One event: its `event:` name (`message` when none) and its `data:` lines joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The event's name.
    pub name: String,
    /// Its data.
    pub data: String,
}

/// An open event stream.
pub struct EventStream {
    socket: TcpStream,
    /// Body bytes received and not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked text not yet parsed into events.
    text: String,
}

/// What opening a stream answered when it was not 200.
#[derive(Debug)]
pub struct Refused {
    /// The status code.
    pub status: u16,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the event stream was refused with status {}",
            self.status
        )
    }
}

impl std::error::Error for Refused {}

impl EventStream {
    /// Opens `GET path` on `addr` with the `cookie` header (`name=value`) when not empty; an
    /// answer other than 200 is an error holding a [`Refused`].
    pub async fn open(addr: &str, path: &str, cookie: &str) -> Result<Self> {
        let mut socket = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        let cookie = if cookie.is_empty() {
            String::new()
        } else {
            format!("cookie: {cookie}\r\n")
        };
        socket
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n{cookie}\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            if head.len() > MAX_HEAD_BYTES {
                bail!("response head over {MAX_HEAD_BYTES} bytes");
            }
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                bail!("connection closed before the response head");
            }
            head.extend_from_slice(&buf[..n]);
        };
        let raw = head.split_off(end + 4);
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status code")?;
        if status != 200 {
            return Err(Refused { status }.into());
        }
        if !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            bail!("expected a chunked event stream:\n{head}");
        }
        Ok(Self {
            socket,
            raw,
            text: String::new(),
        })
    }

    /// The next event, waiting at most `timeout`; an error when the stream ends.
    pub async fn next(&mut self, timeout: Duration) -> Result<Event> {
        tokio::time::timeout(timeout, self.next_inner())
            .await
            .context("no event in time")?
    }

    /// The next event named `name` whose data satisfies `matches`, waiting at most `timeout`
    /// in all.
    pub async fn next_matching(
        &mut self,
        name: &str,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<Event> {
        tokio::time::timeout(timeout, async {
            loop {
                let event = self.next_inner().await?;
                if event.name == name && matches(&event.data) {
                    return Ok(event);
                }
            }
        })
        .await
        .with_context(|| format!("no matching `{name}` event in time"))?
    }

    async fn next_inner(&mut self) -> Result<Event> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            self.dechunk()?;
            if let Some(event) = self.parse() {
                return Ok(event);
            }
            if self.text.len() > MAX_PENDING_BYTES {
                bail!("an event over {MAX_PENDING_BYTES} bytes");
            }
            let n = self.socket.read(&mut buf).await?;
            if n == 0 {
                bail!("the event stream ended");
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// Moves every whole chunk from `raw` to `text`.
    fn dechunk(&mut self) -> Result<()> {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return Ok(());
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size {size_text:?}"))?;
            if size == 0 {
                bail!("the event stream ended");
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return Ok(());
            }
            self.text
                .push_str(&String::from_utf8_lossy(&self.raw[start..start + size]));
            self.raw.drain(..start + size + 2);
        }
    }

    /// Takes the first whole event from `text`; comments (keep-alives) are skipped.
    fn parse(&mut self) -> Option<Event> {
        loop {
            let end = self.text.find("\n\n")?;
            let block: String = self.text.drain(..end + 2).collect();
            let mut name = String::from("message");
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim_start().to_owned();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            if !data.is_empty() {
                return Some(Event {
                    name,
                    data: data.join("\n"),
                });
            }
        }
    }
}

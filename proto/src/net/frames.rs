//! [`crate::wire`] frames and raw bytes on QUIC streams.
//!
//! A frame's length prefix is checked against the caller's bound before its payload is
//! allocated, and every way a frame can be bad is its own [`NetError`] variant
//! ([`NetError::FrameTooLarge`], [`NetError::MalformedFrame`], [`NetError::ProtocolVersion`],
//! [`NetError::Truncated`]; see [`NetError::is_bad_input`]), so a server can count it and
//! refuse that one stream ([`refuse_stream`]) while the connection's other streams go on.

use quinn::{Connection, ReadExactError, RecvStream, SendStream, VarInt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::NetError;
use crate::wire::{
    decode_length, decode_payload, encode_frame, ErrorCode, Request, Response, LENGTH_PREFIX_BYTES,
};

/// Application error code with which a server stops reading a stream whose request it refused.
pub const BAD_REQUEST_STOP_CODE: u32 = 1;

/// Writes `message` as one frame and returns its size in bytes (for traffic counters). Does not
/// finish the stream.
pub async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    message: &T,
) -> Result<usize, NetError> {
    let frame = encode_frame(message)?;
    send.write_all(&frame).await?;
    Ok(frame.len())
}

/// Reads one frame of at most `max_bytes` (capped at [`crate::wire::MAX_FRAME_BYTES`]).
/// Returns `None` when the stream ends cleanly before a frame starts; a stream that ends inside
/// a frame is [`NetError::Truncated`].
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max_bytes: usize,
) -> Result<Option<T>, NetError> {
    Ok(read_frame_counted(recv, max_bytes)
        .await?
        .map(|(message, _)| message))
}

/// [`read_frame`] that also returns the frame's size in bytes, length prefix included (for
/// traffic counters).
pub async fn read_frame_counted<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max_bytes: usize,
) -> Result<Option<(T, usize)>, NetError> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    let got = read_up_to(recv, &mut prefix).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < LENGTH_PREFIX_BYTES {
        return Err(NetError::Truncated {
            expected: LENGTH_PREFIX_BYTES,
            got,
        });
    }
    // Checked before allocating: a hostile prefix costs nothing.
    let len = decode_length(prefix, max_bytes)?;
    let mut payload = vec![0u8; len];
    read_exact(recv, &mut payload).await?;
    Ok(Some((decode_payload(&payload)?, LENGTH_PREFIX_BYTES + len)))
}

/// Fills `buf` completely from the stream; a stream that ends first is
/// [`NetError::Truncated`]. Use it to feed fixed-size pieces of raw data (bao encodings) to a
/// decoder.
pub async fn read_exact(recv: &mut RecvStream, buf: &mut [u8]) -> Result<(), NetError> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(ReadExactError::FinishedEarly(got)) => Err(NetError::Truncated {
            expected: buf.len(),
            got,
        }),
        Err(ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read (less than
/// `buf.len()` only at the end of the stream).
pub async fn read_up_to(recv: &mut RecvStream, buf: &mut [u8]) -> Result<usize, NetError> {
    let mut filled = 0;
    while filled < buf.len() {
        match recv.read(&mut buf[filled..]).await? {
            Some(n) => filled += n,
            None => break,
        }
    }
    Ok(filled)
}

/// Opens a stream for `request`, sends it and finishes the sending side (one request per
/// stream). Returns the receiving side, where the answer arrives: one frame, several frames
/// with raw data between them (blobs), or a stream that stays open (subscriptions).
pub async fn send_request(conn: &Connection, request: &Request) -> Result<RecvStream, NetError> {
    let (mut send, recv) = conn.open_bi().await?;
    write_frame(&mut send, request).await?;
    send.finish()?;
    Ok(recv)
}

/// Sends `request` on a new stream and reads the one-frame answer (at most
/// `max_response_bytes`). A [`Response::Error`] is returned as a response, not an error.
pub async fn call(
    conn: &Connection,
    request: &Request,
    max_response_bytes: usize,
) -> Result<Response, NetError> {
    let mut recv = send_request(conn, request).await?;
    read_frame(&mut recv, max_response_bytes)
        .await?
        .ok_or_else(|| {
            NetError::UnexpectedMessage("the server closed the stream without answering".to_owned())
        })
}

/// Refuses one stream whose request was bad: stops reading it, answers
/// [`Response::Error`] with [`ErrorCode::BadRequest`] and `err`'s text, and finishes. The
/// connection's other streams are unaffected.
pub async fn refuse_stream(
    send: &mut SendStream,
    recv: &mut RecvStream,
    err: &NetError,
) -> Result<(), NetError> {
    // Ignored: the stream may already be finished or reset by the peer, which is fine here.
    let _ = recv.stop(VarInt::from_u32(BAD_REQUEST_STOP_CODE));
    let answer = Response::Error {
        code: ErrorCode::BadRequest,
        message: err.to_string(),
    };
    write_frame(send, &answer).await?;
    send.finish()?;
    Ok(())
}

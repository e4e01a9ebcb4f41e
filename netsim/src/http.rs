//! A small HTTP/1.1 client (hyper's) for what netsim and the tests ask of the daemons' HTTP
//! endpoints: metrics, health and the origin's console. One request per connection.

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// How long one request may take, connection and body included.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a server answered.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body, as text (lossy).
    pub body: String,
}

impl Response {
    /// Every value of header `name`, as text.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }
}

/// Sends `method path` with `headers` and `body` to `addr` (`host:port`) and reads the whole
/// answer.
pub async fn request(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Response> {
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        request_inner(addr, method, path, headers, body),
    )
    .await
    .with_context(|| format!("HTTP request to {addr}{path} timed out"))?
}

async fn request_inner(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Response> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach HTTP endpoint {addr}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr} failed"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "HTTP client connection ended");
        }
    });
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr);
    for (name, value) in headers {
        builder = builder.header(
            HeaderName::from_bytes(name.as_bytes()).context("bad header name")?,
            HeaderValue::from_str(value).context("bad header value")?,
        );
    }
    let request = builder
        .body(Full::new(Bytes::from(body)))
        .context("cannot build the HTTP request")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("HTTP request to {addr}{path} failed"))?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("cannot read the answer of {addr}{path}"))?
        .to_bytes();
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `GET path` from `addr`.
pub async fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    request(addr, Method::GET, path, headers, Vec::new()).await
}

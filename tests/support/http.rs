//! A minimal HTTP/1.1 GET, enough to scrape the relay's endpoints without
//! an HTTP client dependency.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Status code and body of `GET base_url + path`.
pub async fn get(base_url: &str, path: &str) -> (u16, String) {
    try_get(base_url, path)
        .await
        .unwrap_or_else(|| panic!("GET {base_url}{path}: no HTTP answer from the relay"))
}

/// Like `get`, but `None` while nothing answers (the relay not listening yet).
pub async fn try_get(base_url: &str, path: &str) -> Option<(u16, String)> {
    let address = base_url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8(response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    // axum answers small bodies with Content-Length; Prometheus may chunk.
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some((status, body))
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

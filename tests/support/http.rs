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
    // axum answers small bodies with Content-Length, not chunked.
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

//! A minimal HTTP/1.1 GET, enough to scrape the relay's endpoints without
//! an HTTP client dependency.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Status code and body of `GET base_url + path`.
pub async fn get(base_url: &str, path: &str) -> (u16, String) {
    let address = base_url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address)
        .await
        .expect("connect to the relay's HTTP endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read response");
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status code");
    // axum answers small bodies with Content-Length, not chunked.
    (status, body.to_string())
}

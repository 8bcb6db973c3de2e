//! Prometheus for the end-to-end tests: HTTP GETs that wait politely for a listener, a
//! value read from a `/metrics` text, and queries of Prometheus' HTTP API.

use crate::dashboard::http;

/// GET `path` on 127.0.0.1:`port`: status and body, or status 0 while nothing listens.
pub async fn get(port: u16, path: &str) -> (u16, String) {
    if tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        return (0, String::new());
    }
    http(port, "GET", path, &[], None).await
}

/// The value of `name` (without labels) in a `/metrics` text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
}

/// The one value Prometheus on `port` returns for the instant query `expr`, if it
/// returns exactly one.
pub async fn query(port: u16, expr: &str) -> Option<f64> {
    let encoded: String = expr
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                (byte as char).to_string()
            }
            byte => format!("%{byte:02X}"),
        })
        .collect();
    let (status, body) = get(port, &format!("/api/v1/query?query={encoded}")).await;
    if status != 200 {
        return None;
    }
    let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
    let results = answer["data"]["result"].as_array()?;
    let [result] = results.as_slice() else {
        return None;
    };
    result["value"][1].as_str()?.parse().ok()
}

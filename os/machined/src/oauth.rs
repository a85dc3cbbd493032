//! OAuth2 device authorization grant (RFC 8628) for the configuration download: the
//! `kiln.config.oauth.*` kernel arguments, the device flow with the guide's console lines
//! (verification URL, user code, a QR code when the provider gives a complete URL), polling
//! at the server's interval with `slow_down`, and the access token the download then sends.
//!
//! The protocol is a form POST and a JSON answer per step; reqwest does the HTTP. No
//! maintained crate runs the device flow with these console lines and the `extra_variable`
//! form fields, so the steps are written here (the `oauth2` crate's device flow offers
//! neither).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// The `kiln.config.oauth.*` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthSettings {
    /// `client_id` (required to enable the flow).
    pub client_id: String,
    /// `client_secret`.
    pub client_secret: Option<String>,
    /// `scope`, repeatable.
    pub scopes: Vec<String>,
    /// `audience`.
    pub audience: Option<String>,
    /// `device_auth_url` (default: the configuration URL with path `/device/code`).
    pub device_auth_url: String,
    /// `token_url` (default: the configuration URL with path `/token`).
    pub token_url: String,
    /// `extra_variable`, repeatable: variables sent to the device endpoint.
    pub extra_variables: Vec<String>,
}

/// Why the device flow did not give a token.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// A URL does not parse.
    #[error("[OAuth] {what} {url:?} is not a valid URL: {reason}")]
    Url {
        /// Which URL.
        what: &'static str,
        /// The value.
        url: String,
        /// The parser's message.
        reason: String,
    },
    /// An extra variable is not known.
    #[error(
        "[OAuth] extra variable {0:?} is not known: use hostname, ip or uuid in kiln.config.oauth.extra_variable"
    )]
    UnknownVariable(String),
    /// An HTTP request failed.
    #[error("[OAuth] {step} at {url}: {source}")]
    Http {
        /// Which step.
        step: &'static str,
        /// The URL.
        url: String,
        /// The error.
        source: reqwest::Error,
    },
    /// The server answered something that is not the protocol's.
    #[error("[OAuth] {step} at {url}: unexpected answer {status}: {body}")]
    Protocol {
        /// Which step.
        step: &'static str,
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The body (shortened).
        body: String,
    },
    /// The user denied the authorization.
    #[error(
        "[OAuth] the authorization was denied (access_denied{description}): approve the request on the provider and reboot the node to start a new device flow"
    )]
    Denied {
        /// The server's description, with a leading `: ` when present.
        description: String,
    },
    /// The device code expired before the user authorized it.
    #[error(
        "[OAuth] the device code expired (at {at}) before the device was authorized: reboot the node to start a new device flow"
    )]
    Expired {
        /// When it expired (UTC, HH:MM:SS).
        at: String,
    },
    /// The token endpoint answered another error.
    #[error("[OAuth] the token endpoint {url} refused the device code: {error}{description}")]
    Refused {
        /// The URL.
        url: String,
        /// The RFC 6749 error code.
        error: String,
        /// Its description, with a leading `: `.
        description: String,
    },
}

fn with_path(base: &str, path: &str) -> Result<String, OAuthError> {
    let mut url = reqwest::Url::parse(base).map_err(|e| OAuthError::Url {
        what: "kiln.config",
        url: base.to_owned(),
        reason: e.to_string(),
    })?;
    url.set_path(path);
    url.set_query(None);
    url.set_fragment(None);
    Ok(url.to_string())
}

impl OAuthSettings {
    /// The settings on a kernel command line for the configuration URL `config_url`; `None`
    /// when `kiln.config.oauth.client_id` is not set (the download is not authenticated).
    pub fn from_cmdline(cmdline: &str, config_url: &str) -> Result<Option<Self>, OAuthError> {
        let mut values: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for arg in cmdline.split_whitespace() {
            if let Some((key, value)) = arg
                .strip_prefix("kiln.config.oauth.")
                .and_then(|a| a.split_once('='))
            {
                values.entry(key).or_default().push(value.to_owned());
            }
        }
        let last = |k: &str| {
            values
                .get(k)
                .and_then(|v| v.last().cloned())
                .filter(|v| !v.is_empty())
        };
        let Some(client_id) = last("client_id") else {
            return Ok(None);
        };
        let device_auth_url = match last("device_auth_url") {
            Some(u) => u,
            None => with_path(config_url, "/device/code")?,
        };
        let token_url = match last("token_url") {
            Some(u) => u,
            None => with_path(config_url, "/token")?,
        };
        for (what, url) in [
            ("device_auth_url", &device_auth_url),
            ("token_url", &token_url),
        ] {
            reqwest::Url::parse(url).map_err(|e| OAuthError::Url {
                what,
                url: url.clone(),
                reason: e.to_string(),
            })?;
        }
        let all = |k: &str| values.get(k).cloned().unwrap_or_default();
        Ok(Some(Self {
            client_id,
            client_secret: last("client_secret"),
            scopes: all("scope"),
            audience: last("audience"),
            device_auth_url,
            token_url,
            extra_variables: all("extra_variable"),
        }))
    }
}

/// The device authorization response (RFC 8628 §3.2).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAuthorization {
    /// The device verification code.
    pub device_code: String,
    /// The code the user enters.
    pub user_code: String,
    /// Where the user goes.
    #[serde(alias = "verification_url")]
    pub verification_uri: String,
    /// The same with the user code in it.
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    /// Lifetime of the codes, in seconds.
    pub expires_in: u64,
    /// Polling interval, in seconds (5 when absent).
    #[serde(default)]
    pub interval: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The device flow's clock: how long one of the server's "seconds" is (one second; tests
/// shorten it) and how much `slow_down` adds (5 seconds, RFC 8628 §3.5).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// One interval unit.
    pub second: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            second: Duration::from_secs(1),
        }
    }
}

/// A QR code of `text` in half-block characters for a console, as the guide shows it.
pub fn qr_code(text: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

fn hhmmss(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02}", day / 3600, day % 3600 / 60, day % 60)
}

fn go_quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

fn short(body: &str) -> String {
    body.chars().take(200).collect()
}

/// Runs the device flow; `say` prints a console line. `variables` are the values the
/// `extra_variable` names may take.
pub async fn device_flow(
    settings: &OAuthSettings,
    variables: &BTreeMap<String, String>,
    timing: Timing,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<String, OAuthError> {
    say("[OAuth] starting the authentication device flow with the following settings:".into());
    say(format!("[OAuth]  - client ID: {:?}", settings.client_id));
    say(format!(
        "[OAuth]  - device auth URL: {:?}",
        settings.device_auth_url
    ));
    say(format!("[OAuth]  - token URL: {:?}", settings.token_url));
    if !settings.scopes.is_empty() {
        say(format!(
            "[OAuth]  - scopes: {}",
            go_quoted_list(&settings.scopes)
        ));
    }
    if let Some(a) = &settings.audience {
        say(format!("[OAuth]  - audience: {a:?}"));
    }
    if !settings.extra_variables.is_empty() {
        say(format!(
            "[OAuth]  - extra variables: {}",
            go_quoted_list(&settings.extra_variables)
        ));
    }
    let mut form: Vec<(String, String)> = vec![("client_id".into(), settings.client_id.clone())];
    if let Some(s) = &settings.client_secret {
        form.push(("client_secret".into(), s.clone()));
    }
    if !settings.scopes.is_empty() {
        form.push(("scope".into(), settings.scopes.join(" ")));
    }
    if let Some(a) = &settings.audience {
        form.push(("audience".into(), a.clone()));
    }
    for name in &settings.extra_variables {
        let value = variables
            .get(name)
            .ok_or_else(|| OAuthError::UnknownVariable(name.clone()))?;
        form.push((name.clone(), value.clone()));
    }
    let client = reqwest::Client::builder()
        .connect_timeout(crate::config_source::FETCH_CONNECT_TIMEOUT)
        .timeout(crate::config_source::FETCH_TIMEOUT)
        .use_rustls_tls()
        .build()
        .map_err(|source| OAuthError::Http {
            step: "building the HTTP client",
            url: settings.device_auth_url.clone(),
            source,
        })?;
    let url = &settings.device_auth_url;
    let http = |step, source| OAuthError::Http {
        step,
        url: url.clone(),
        source,
    };
    let response = client
        .post(url)
        .form(&form)
        .send()
        .await
        .map_err(|e| http("requesting a device code", e))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .map_err(|e| http("requesting a device code", e))?;
    let auth: DeviceAuthorization = match serde_json::from_str(&body) {
        Ok(a) if status == 200 => a,
        _ => {
            return Err(OAuthError::Protocol {
                step: "requesting a device code",
                url: url.clone(),
                status,
                body: short(&body),
            });
        }
    };
    let expires_at =
        SystemTime::now() + timing.second * u32::try_from(auth.expires_in).unwrap_or(u32::MAX);
    say(format!(
        "[OAuth] please visit the URL {} and enter the code {}",
        auth.verification_uri, auth.user_code
    ));
    if let Some(complete) = &auth.verification_uri_complete
        && let Some(qr) = qr_code(complete)
    {
        say(format!("[OAuth] or scan the following QR code:\n{qr}"));
    }
    say(format!(
        "[OAuth] waiting for the device to be authorized (expires at {})...",
        hhmmss(expires_at)
    ));
    let token = poll_token(&client, settings, &auth, expires_at, timing).await?;
    say("[OAuth] device authorized".into());
    Ok(token)
}

/// Polls the token endpoint (RFC 8628 §3.4, §3.5) until a token, a denial or the expiry.
async fn poll_token(
    client: &reqwest::Client,
    settings: &OAuthSettings,
    auth: &DeviceAuthorization,
    expires_at: SystemTime,
    timing: Timing,
) -> Result<String, OAuthError> {
    let url = &settings.token_url;
    let mut interval = timing.second * u32::try_from(auth.interval.unwrap_or(5)).unwrap_or(5);
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("device_code", &auth.device_code),
        ("client_id", &settings.client_id),
    ];
    if let Some(s) = &settings.client_secret {
        form.push(("client_secret", s));
    }
    let expired = || OAuthError::Expired {
        at: hhmmss(expires_at),
    };
    loop {
        // The protocol's own pacing: wait the interval before every request.
        tokio::time::sleep(interval).await;
        if SystemTime::now() >= expires_at {
            return Err(expired());
        }
        let response = client.post(url).form(&form).send().await;
        let response = match response {
            Ok(r) => r,
            // A lost request is retried at the next interval (§3.5 asks for backing off).
            Err(e) if e.is_timeout() || e.is_connect() => {
                interval += timing.second * 5;
                continue;
            }
            Err(source) => {
                return Err(OAuthError::Http {
                    step: "polling for the token",
                    url: url.clone(),
                    source,
                });
            }
        };
        let status = response.status().as_u16();
        let body = response.text().await.map_err(|source| OAuthError::Http {
            step: "polling for the token",
            url: url.clone(),
            source,
        })?;
        let answer: TokenAnswer =
            serde_json::from_str(&body).map_err(|_| OAuthError::Protocol {
                step: "polling for the token",
                url: url.clone(),
                status,
                body: short(&body),
            })?;
        if status == 200
            && let Some(token) = answer.access_token
        {
            return Ok(token);
        }
        let description = answer
            .error_description
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        match answer.error.as_deref() {
            Some("authorization_pending") => {}
            Some("slow_down") => interval += timing.second * 5,
            Some("access_denied") => return Err(OAuthError::Denied { description }),
            Some("expired_token") => return Err(expired()),
            Some(other) => {
                return Err(OAuthError::Refused {
                    url: url.clone(),
                    error: other.to_owned(),
                    description,
                });
            }
            None => {
                return Err(OAuthError::Protocol {
                    step: "polling for the token",
                    url: url.clone(),
                    status,
                    body: short(&body),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn settings_come_from_the_kernel_command_line_with_the_guides_defaults() {
        let s = OAuthSettings::from_cmdline(
            "console=ttyS0 kiln.config=http://10.5.0.1:8080/c.yaml?x=1 kiln.config.oauth.client_id=abc \
             kiln.config.oauth.scope=openid kiln.config.oauth.scope=email \
             kiln.config.oauth.extra_variable=uuid kiln.config.oauth.extra_variable=hostname",
            "http://10.5.0.1:8080/c.yaml?x=1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.client_id, "abc");
        assert_eq!(s.device_auth_url, "http://10.5.0.1:8080/device/code");
        assert_eq!(s.token_url, "http://10.5.0.1:8080/token");
        assert_eq!(s.scopes, ["openid", "email"]);
        assert_eq!(s.extra_variables, ["uuid", "hostname"]);
        assert_eq!(s.client_secret, None);
        assert_eq!(
            OAuthSettings::from_cmdline("kiln.config=http://h/c", "http://h/c").unwrap(),
            None
        );
        let e = OAuthSettings::from_cmdline(
            "kiln.config.oauth.client_id=a kiln.config.oauth.token_url=nope",
            "http://h/c",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("token_url \"nope\" is not a valid URL"),
            "{e}"
        );
    }

    #[test]
    fn a_qr_code_is_half_blocks() {
        let qr = qr_code("https://example.com/device?code=WDJB-MJHT").unwrap();
        assert!(qr.lines().count() > 10);
        assert!(qr.contains('█') && qr.contains('▄'), "{qr}");
    }

    /// A scripted RFC 8628 server: the device endpoint answers once, the token endpoint answers
    /// `token_answers` in turn (status, body); every request's arrival time and form is kept.
    async fn provider(
        token_answers: Vec<(&'static str, &'static str)>,
        complete: bool,
    ) -> (
        String,
        Arc<Mutex<Vec<(tokio::time::Instant, String, String)>>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (b, log) = (base.clone(), seen.clone());
        tokio::spawn(async move {
            let mut answers = token_answers.into_iter();
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = conn.read(&mut buf).await.unwrap();
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len || n == 0 {
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&request).into_owned();
                let path = text
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                let body = text
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_owned())
                    .unwrap_or_default();
                log.lock()
                    .unwrap()
                    .push((tokio::time::Instant::now(), path.clone(), body));
                let (status, answer) = if path == "/device/code" {
                    let complete = if complete {
                        format!(r#","verification_uri_complete":"{b}/device?c=AB""#)
                    } else {
                        String::new()
                    };
                    (
                        "200 OK",
                        format!(
                            r#"{{"device_code":"dc","user_code":"AB-CD","verification_uri":"{b}/device"{complete},"expires_in":600,"interval":1}}"#
                        ),
                    )
                } else {
                    let (s, a) = answers
                        .next()
                        .unwrap_or(("400 Bad Request", r#"{"error":"expired_token"}"#));
                    (s, a.to_owned())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                conn.write_all(response.as_bytes()).await.unwrap();
                let _ = conn.shutdown().await;
            }
        });
        (base, seen)
    }

    fn settings(base: &str) -> OAuthSettings {
        OAuthSettings::from_cmdline(
            "kiln.config.oauth.client_id=kiln kiln.config.oauth.client_secret=s3cret \
             kiln.config.oauth.audience=lab kiln.config.oauth.extra_variable=hostname",
            &format!("{base}/config.yaml"),
        )
        .unwrap()
        .unwrap()
    }

    const TIMING: Timing = Timing {
        second: Duration::from_millis(40),
    };

    #[tokio::test]
    async fn the_flow_polls_at_the_interval_slows_down_and_returns_the_token() {
        let (base, seen) = provider(
            vec![
                ("400 Bad Request", r#"{"error":"authorization_pending"}"#),
                ("400 Bad Request", r#"{"error":"slow_down"}"#),
                ("200 OK", r#"{"access_token":"tok","token_type":"Bearer"}"#),
            ],
            true,
        )
        .await;
        let lines = Mutex::new(Vec::new());
        let vars = BTreeMap::from([("hostname".to_owned(), "cp-1".to_owned())]);
        let token = device_flow(&settings(&base), &vars, TIMING, &|l| {
            lines.lock().unwrap().push(l);
        })
        .await
        .unwrap();
        assert_eq!(token, "tok");
        let lines = lines.into_inner().unwrap().join("\n");
        for l in [
            "[OAuth]  - client ID: \"kiln\"",
            &format!("[OAuth]  - device auth URL: \"{base}/device/code\""),
            "[OAuth]  - extra variables: [\"hostname\"]",
            &format!("[OAuth] please visit the URL {base}/device and enter the code AB-CD"),
            "[OAuth] or scan the following QR code:\n",
            "[OAuth] waiting for the device to be authorized (expires at ",
            "[OAuth] device authorized",
        ] {
            assert!(lines.contains(l), "{l:?} missing:\n{lines}");
        }
        assert!(!lines.contains("s3cret"), "the secret is never printed");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4);
        let device = &seen[0].2;
        for field in [
            "client_id=kiln",
            "client_secret=s3cret",
            "audience=lab",
            "hostname=cp-1",
        ] {
            assert!(device.contains(field), "{device}");
        }
        assert!(
            seen[1]
                .2
                .contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code")
        );
        // One interval between the first polls, six (1 + slow_down's 5) after slow_down.
        let gap = |i: usize| seen[i + 1].0 - seen[i].0;
        assert!(gap(1) >= TIMING.second, "{:?}", gap(1));
        assert!(gap(2) >= TIMING.second * 6, "{:?}", gap(2));
    }

    #[tokio::test]
    async fn a_denied_or_expired_authorization_is_an_error_that_says_so() {
        let (base, _) = provider(
            vec![(
                "400 Bad Request",
                r#"{"error":"access_denied","error_description":"no"}"#,
            )],
            false,
        )
        .await;
        let lines = Mutex::new(Vec::new());
        let vars = BTreeMap::from([("hostname".to_owned(), "w".to_owned())]);
        let e = device_flow(&settings(&base), &vars, TIMING, &|l| {
            lines.lock().unwrap().push(l);
        })
        .await
        .unwrap_err();
        assert!(matches!(e, OAuthError::Denied { .. }), "{e}");
        assert!(e.to_string().contains("denied (access_denied: no)"), "{e}");
        assert!(
            !lines.into_inner().unwrap().join("\n").contains("QR code"),
            "no QR code without a complete URL"
        );

        let (base, _) = provider(vec![], false).await;
        let e = device_flow(&settings(&base), &vars, TIMING, &|_| {})
            .await
            .unwrap_err();
        assert!(matches!(e, OAuthError::Expired { .. }), "{e}");
        assert!(e.to_string().contains("reboot the node"), "{e}");

        let e = device_flow(&settings(&base), &BTreeMap::new(), TIMING, &|_| {})
            .await
            .unwrap_err();
        assert!(matches!(e, OAuthError::UnknownVariable(_)), "{e}");
    }
}

//! Validated names: repository names, tags, digests and the `HOST/NAME[:TAG|@DIGEST]` image
//! references the command line takes. Every path on disk is built from these, so a name that
//! passes here cannot escape the storage root.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// The longest repository name accepted (the distribution spec's limit).
const MAX_NAME_LEN: usize = 255;

/// A repository name was not valid.
#[derive(Debug, thiserror::Error)]
#[error("invalid repository name {name:?}: {reason}")]
pub struct InvalidName {
    /// What was given.
    pub name: String,
    /// What was wrong with it.
    pub reason: &'static str,
}

/// A tag or digest was not valid.
#[derive(Debug, thiserror::Error)]
pub enum InvalidReference {
    /// Not a tag (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`).
    #[error(
        "invalid tag {0:?}: tags are 1 to 128 of A-Z a-z 0-9 _ . - and do not start with . or -"
    )]
    Tag(String),
    /// Not a `sha256:<64 lowercase hex>` digest.
    #[error("invalid digest {0:?}: only sha256:<64 lowercase hex digits> is supported")]
    Digest(String),
}

/// A repository name such as `library/alpine`: path components of lowercase alphanumerics
/// separated by `.`, `_`, `__` or runs of `-`, joined by `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if is_alnum(ch) {
            i += 1;
            continue;
        }
        // A separator: ".", "_", "__" or one or more "-", always followed by an alphanumeric.
        let start = i;
        match ch {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

impl FromStr for RepoName {
    type Err = InvalidName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| InvalidName {
            name: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(err("it is longer than 255 characters"));
        }
        if !s.split('/').all(valid_component) {
            return Err(err(
                "each /-separated part must be lowercase letters and digits, joined by '.', '_', '__' or '-'",
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

/// A content digest; only sha256 is supported.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(data).into())
    }

    /// A digest from a finished sha256 hash.
    pub fn from_sha256(hash: [u8; 32]) -> Self {
        Self(format!("sha256:{}", hex::encode(hash)))
    }

    /// The full text, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part (64 characters), safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = InvalidReference;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| InvalidReference::Digest(s.to_owned()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(InvalidReference::Digest(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }
}

/// A tag such as `v1.2.3` or `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Tag {
    type Err = InvalidReference;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidReference::Tag(s.to_owned()))
        }
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => t.fmt(f),
            Self::Digest(d) => d.fmt(f),
        }
    }
}

impl FromStr for Reference {
    type Err = InvalidReference;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            s.parse().map(Self::Digest)
        } else {
            s.parse().map(Self::Tag)
        }
    }
}

/// An image reference as the command line takes it: `HOST[:PORT]/NAME[:TAG][@DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host and optional port.
    pub host: String,
    /// Repository name.
    pub name: RepoName,
    /// Tag or digest (default tag `latest`).
    pub reference: Reference,
}

/// An image reference could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum InvalidImageRef {
    /// No `HOST/` part.
    #[error("image reference {0:?} has no registry host: write HOST[:PORT]/NAME[:TAG]")]
    NoHost(String),
    /// Bad repository name.
    #[error(transparent)]
    Name(#[from] InvalidName),
    /// Bad tag or digest.
    #[error(transparent)]
    Reference(#[from] InvalidReference),
}

impl ImageRef {
    /// Parses a reference as container runtimes read one: a first component without `.` or
    /// `:` (and not `localhost`) is not a host, so `kiln/installer:v1` is
    /// `docker.io/kiln/installer:v1` and `alpine` is `docker.io/library/alpine:latest`.
    /// ([`FromStr`] wants the host written out.)
    pub fn normalized(s: &str) -> Result<Self, InvalidImageRef> {
        let first = s.split('/').next().unwrap_or_default();
        let has_host =
            s.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
        if has_host {
            s.parse()
        } else if s.contains('/') {
            format!("docker.io/{s}").parse()
        } else {
            format!("docker.io/library/{s}").parse()
        }
    }
}

impl FromStr for ImageRef {
    type Err = InvalidImageRef;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, rest) = s
            .split_once('/')
            .filter(|(h, r)| !h.is_empty() && !r.is_empty())
            .ok_or_else(|| InvalidImageRef::NoHost(s.to_owned()))?;
        let (name, reference) = if let Some((n, d)) = rest.split_once('@') {
            // `name:tag@digest` is allowed; the digest wins.
            let n = n.split_once(':').map_or(n, |(n, _)| n);
            (n, Reference::Digest(d.parse()?))
        } else if let Some((n, t)) = rest.rsplit_once(':') {
            (n, Reference::Tag(t.parse()?))
        } else {
            (rest, Reference::Tag(Tag("latest".to_owned())))
        };
        Ok(Self {
            host: host.to_owned(),
            name: name.parse()?,
            reference,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalized_as_container_runtimes_do() {
        for (given, host, name, reference) in [
            ("kiln/installer:v1", "docker.io", "kiln/installer", "v1"),
            ("alpine", "docker.io", "library/alpine", "latest"),
            (
                "10.5.0.1:5000/kiln/installer:v1",
                "10.5.0.1:5000",
                "kiln/installer",
                "v1",
            ),
            ("ghcr.io/a/b:t", "ghcr.io", "a/b", "t"),
            ("localhost/a:t", "localhost", "a", "t"),
        ] {
            let r = ImageRef::normalized(given).unwrap();
            assert_eq!(
                (r.host.as_str(), r.name.to_string(), r.reference.to_string()),
                (host, name.to_owned(), reference.to_owned()),
                "{given}"
            );
        }
        assert!(ImageRef::normalized("kiln/Bad:v1").is_err());
    }

    #[test]
    fn names() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-app",
            "my--app",
            "a_b",
            "a__b",
            "a.b/c0",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok}");
        }
        for bad in [
            "", "..", "../etc", "a/../b", "A", "a/", "/a", "a//b", "a___b", "-a", "a-", "a.",
            "a..b", "a b", "a%2f", "_a",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad}");
        }
        assert!("a".repeat(256).parse::<RepoName>().is_err());
    }

    #[test]
    fn references() {
        assert!(matches!("latest".parse(), Ok(Reference::Tag(_))));
        assert!(matches!("v1.2_3-rc".parse(), Ok(Reference::Tag(_))));
        assert!(".hidden".parse::<Reference>().is_err());
        assert!("../x".parse::<Reference>().is_err());
        assert!("a".repeat(129).parse::<Reference>().is_err());
        let d = Digest::of(b"hello");
        assert_eq!(
            d.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(
            d.as_str().parse::<Reference>().ok(),
            Some(Reference::Digest(d.clone()))
        );
        assert!("sha256:ABC".parse::<Digest>().is_err());
        assert!("sha512:00".parse::<Reference>().is_err());
        assert!(d.as_str().to_uppercase().parse::<Digest>().is_err());
    }

    #[test]
    fn image_refs() {
        let r: ImageRef = "127.0.0.1:5000/library/alpine:3.19".parse().unwrap();
        assert_eq!(r.host, "127.0.0.1:5000");
        assert_eq!(r.name.as_str(), "library/alpine");
        assert_eq!(r.reference.to_string(), "3.19");
        let r: ImageRef = "reg.example/app".parse().unwrap();
        assert_eq!(r.reference.to_string(), "latest");
        let d = Digest::of(b"x");
        let r: ImageRef = format!("h/app:1@{d}").parse().unwrap();
        assert_eq!(r.reference, Reference::Digest(d));
        assert!("alpine".parse::<ImageRef>().is_err());
    }
}

//! Bootstrap and machine tokens in the kubeadm format `[a-z0-9]{6}.[a-z0-9]{16}`.

use rand::Rng;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A token that does not have the kubeadm shape.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid token {token:?}: expected six and sixteen characters of [a-z0-9] joined by a dot, \
     e.g. abcdef.0123456789abcdef (as `kubeadm token create` prints)"
)]
pub struct TokenError {
    /// The rejected token.
    pub token: String,
}

/// Creates a random token `[a-z0-9]{6}.[a-z0-9]{16}`.
pub fn generate_token() -> String {
    let mut rng = rand::thread_rng();
    let mut part = |n: usize| -> String {
        (0..n)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect()
    };
    let id = part(6);
    let secret = part(16);
    format!("{id}.{secret}")
}

/// Checks that `token` has the kubeadm shape.
pub fn validate_token(token: &str) -> Result<(), TokenError> {
    let ok = token.split_once('.').is_some_and(|(id, secret)| {
        id.len() == 6
            && secret.len() == 16
            && id
                .bytes()
                .chain(secret.bytes())
                .all(|b| ALPHABET.contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(TokenError {
            token: token.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_validate() {
        for _ in 0..100 {
            validate_token(&generate_token()).unwrap();
        }
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "ABCDEF.0123456789abcdef",
            "abcde.0123456789abcdef0",
            "abcdef.0123456789abcde!",
            "abcdef.0123456789abcdef.x",
        ] {
            let err = validate_token(bad).unwrap_err();
            assert!(err.to_string().contains("kubeadm token create"), "{err}");
        }
    }
}

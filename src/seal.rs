//! Sealing at rest: AES-256-GCM under a key derived from a secret file of `keys.dir`
//! and a label (one key per purpose: `SHA-256(label \0 secret)`), with a random 96-bit
//! nonce in front of each sealed value. The label, and a context the caller gives (the
//! user a TOTP secret belongs to, say), are the associated data: a sealed value moved to
//! another purpose or another row does not open.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

pub struct Sealer {
    key: LessSafeKey,
    label: &'static str,
}

impl Sealer {
    /// `secret`: the bytes of a secret file (see `KeyStore::secret`).
    pub fn new(label: &'static str, secret: &[u8]) -> Self {
        let mut input = label.as_bytes().to_vec();
        input.push(0);
        input.extend_from_slice(secret);
        let key = digest(&SHA256, &input);
        Sealer {
            key: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key.as_ref()).expect("32-byte key"),
            ),
            label,
        }
    }

    fn aad(&self, context: &[u8]) -> Vec<u8> {
        [self.label.as_bytes(), context].concat()
    }

    pub fn seal(&self, plain: &[u8], context: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the OS random generator failed");
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(context)),
                &mut buf,
            )
            .expect("AES-GCM sealing cannot fail for small inputs");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    /// `None` if `sealed` was not sealed under this key and context, or was altered.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(self.aad(context)), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_under_its_key_label_and_context() {
        let sealer = Sealer::new("tessera/test/v1", &[7; 32]);
        let sealed = sealer.seal(b"SECRET", b"user-1");
        assert_eq!(
            sealer.open(&sealed, b"user-1").as_deref(),
            Some(&b"SECRET"[..])
        );
        assert!(!String::from_utf8_lossy(&sealed).contains("SECRET"));
        assert_eq!(sealer.open(&sealed, b"user-2"), None, "another row");
        assert_eq!(
            Sealer::new("tessera/other/v1", &[7; 32]).open(&sealed, b"user-1"),
            None
        );
        assert_eq!(
            Sealer::new("tessera/test/v1", &[8; 32]).open(&sealed, b"user-1"),
            None
        );
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(sealer.open(&altered, b"user-1"), None);
        assert_eq!(sealer.open(&sealed[..5], b"user-1"), None);
    }
}

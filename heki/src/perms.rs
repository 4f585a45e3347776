//! Page permissions as the guest ABI and the REST API spell them.

use serde::{Deserialize, Serialize};

/// READ / WRITE / EXEC / IMMUTABLE bits (guest ABI values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Permissions(u8);

impl Permissions {
    pub const READ: Permissions = Permissions(1);
    pub const WRITE: Permissions = Permissions(2);
    pub const EXEC: Permissions = Permissions(4);
    pub const IMMUTABLE: Permissions = Permissions(8);
    /// What a page has until someone protects it.
    pub const DEFAULT: Permissions = Permissions(7);
    const ALL: u64 = 0xf;
    const NAMES: [(&'static str, Permissions); 4] = [
        ("read", Permissions::READ),
        ("write", Permissions::WRITE),
        ("exec", Permissions::EXEC),
        ("immutable", Permissions::IMMUTABLE),
    ];

    /// Validates guest-supplied bits: no unknown bits, READ required.
    pub fn from_abi(bits: u64) -> Option<Permissions> {
        (bits & !Self::ALL == 0 && bits & 1 == 1).then_some(Permissions(bits as u8))
    }

    /// Parses the REST form: `["read", "exec", "immutable"]`.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Permissions, String> {
        let mut bits = 0u64;
        for name in names {
            let name = name.as_ref();
            let (_, p) = Self::NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| format!("unknown permission '{name}' (expected read, write, exec, immutable)"))?;
            bits |= u64::from(p.0);
        }
        Self::from_abi(bits).ok_or_else(|| "permissions must include \"read\"".to_string())
    }

    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES.iter().filter(|(_, p)| self.contains(*p)).map(|(n, _)| *n).collect()
    }

    pub fn bits(self) -> u64 {
        u64::from(self.0)
    }

    pub fn contains(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn writable(self) -> bool {
        self.contains(Permissions::WRITE)
    }

    pub fn immutable(self) -> bool {
        self.contains(Permissions::IMMUTABLE)
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn abi_bits_need_read_and_no_unknown_bits() {
        assert_eq!(Permissions::from_abi(1), Some(Permissions::READ));
        assert_eq!(Permissions::from_abi(0xd).map(|p| p.immutable()), Some(true));
        assert_eq!(Permissions::from_abi(2), None, "READ missing");
        assert_eq!(Permissions::from_abi(0x11), None, "unknown bit");
    }

    #[test]
    fn names_round_trip() {
        let p = Permissions::from_names(&["read", "exec", "immutable"]).expect("valid");
        assert_eq!(p.bits(), 0xd);
        assert_eq!(p.names(), vec!["read", "exec", "immutable"]);
        assert!(Permissions::from_names(&["write"]).is_err());
        assert!(Permissions::from_names(&["read", "fly"]).is_err());
    }
}

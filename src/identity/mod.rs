//! Who is asking: the source address, an optional proxy user (htpasswd), and API-key
//! fingerprints seen on the request.

pub mod htpasswd;
pub mod keys;

use std::fmt;
use std::sync::Arc;

use htpasswd::Htpasswd;

/// A proxy user who proved a password, with the hash it was proven against. A tunnel keeps
/// it: the user file can change while the tunnel is open, and a user removed, or given a new
/// password, must not go on using what the old login opened.
#[derive(Clone)]
pub struct ProxyUser {
    name: String,
    proof: Arc<str>,
}

impl ProxyUser {
    pub fn new(name: String, proof: Arc<str>) -> ProxyUser {
        ProxyUser { name, proof }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `users` still holds this user with the same password hash.
    pub fn still_in(&self, users: &Htpasswd) -> bool {
        users
            .hash_of(&self.name)
            .is_some_and(|h| Arc::ptr_eq(h, &self.proof) || **h == *self.proof)
    }
}

/// The hash stays out of logs.
impl fmt::Debug for ProxyUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ProxyUser").field(&self.name).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOB: &str = "$2y$04$Dz9UVrRbA6kFnfW1/rZ7QeLxyb9R1l2p9PCe0Xn5N9Y0jv6k7h1Mu";

    fn users(text: &str) -> Htpasswd {
        Htpasswd::parse("users", text).unwrap()
    }

    #[test]
    fn a_login_holds_until_the_user_is_removed_or_the_password_changes() {
        let before = users(&format!("bob:{BOB}\nann:{BOB}\n"));
        let bob = ProxyUser::new("bob".into(), before.hash_of("bob").unwrap().clone());
        assert!(bob.still_in(&before));
        // The file read again, unchanged for bob: new allocations, same hash.
        assert!(bob.still_in(&users(&format!("ann:{BOB}\nbob:{BOB}\n"))));
        assert!(!bob.still_in(&users(&format!("ann:{BOB}\n"))));
        let other = BOB.replace("Mu", "Mv");
        assert!(!bob.still_in(&users(&format!("bob:{other}\n"))));
        assert_eq!(format!("{bob:?}"), r#"ProxyUser("bob")"#);
    }
}

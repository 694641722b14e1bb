//! Identifiers that name listeners, service sessions and connections for the
//! life of a process (and across an upgrade, which carries them over).

use std::fmt;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// A public listening socket.
    ListenerId
);
id!(
    /// A service's control session.
    SessionId
);
id!(
    /// A client connection on its way to a service.
    ConnId
);

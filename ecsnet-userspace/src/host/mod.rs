//! The live host as ecsnet reads it: links, addresses, neighbours and routes (`netlink`),
//! ARP probes (`arp`) and named network namespaces (`netns`).

pub(crate) mod arp;
pub mod netlink;
pub mod netns;

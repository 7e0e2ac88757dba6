//! The one exit of every program: a `Result<Verdict, DropReason>` becomes a return code, and
//! every drop is counted with its reason and hook, and offered to `ecsnet monitor`, here and
//! nowhere else.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action};
use ecsnet_common::{
    DropReason,
    flow::{ACTION_ACCEPT, ACTION_REJECT},
    maps::DropKey,
};

use crate::{account, events, parse::Packet};

/// What a program decided for a packet it did not drop.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// Continue on the kernel's path.
    Pass,
    /// A redirect helper took the packet (`TC_ACT_REDIRECT`).
    Redirect,
    /// Dropped and already counted, on another interface than the program's (see [`drop_on`]).
    Dropped,
}

/// Passes the packet on when `ok`, else drops it for `reason`.
#[inline(always)]
pub fn pass_or(ok: bool, reason: DropReason) -> Result<Verdict, DropReason> {
    if ok { Ok(Verdict::Pass) } else { Err(reason) }
}

/// The flow-log action of a program's result: ACCEPT for a packet that went on, REJECT for one
/// the security groups dropped (`rejected`, the reason of the direction at hand); None for any
/// other drop, which no flow record shows.
#[inline(always)]
pub fn action(res: &Result<Verdict, DropReason>, rejected: DropReason) -> Option<u8> {
    match res {
        Ok(_) => Some(ACTION_ACCEPT),
        Err(reason) if *reason == rejected => Some(ACTION_REJECT),
        Err(_) => None,
    }
}

/// Counts a drop on `ifindex` (a task the packet was for) and says to drop the packet.
#[inline(always)]
pub fn drop_on<P: Packet>(pkt: &P, reason: DropReason, ifindex: u32, hook: u8) -> Verdict {
    drop_counted(pkt, reason, ifindex, hook);
    Verdict::Dropped
}

/// Return code of a TC program for `res`, counting a drop on `ifindex` at `hook`.
#[inline(always)]
pub fn tc<P: Packet>(pkt: &P, res: Result<Verdict, DropReason>, ifindex: u32, hook: u8) -> i32 {
    match res {
        Ok(Verdict::Pass) => TC_ACT_OK,
        Ok(Verdict::Redirect) => TC_ACT_REDIRECT,
        Ok(Verdict::Dropped) => TC_ACT_SHOT,
        Err(reason) => {
            drop_counted(pkt, reason, ifindex, hook);
            TC_ACT_SHOT
        }
    }
}

/// Return code of an XDP program for `res`, counting a drop on `ifindex` at `hook`.
#[inline(always)]
pub fn xdp<P: Packet>(pkt: &P, res: Result<Verdict, DropReason>, ifindex: u32, hook: u8) -> u32 {
    match res {
        // XDP never redirects today; a redirect verdict here would be a bug, so pass.
        Ok(Verdict::Pass | Verdict::Redirect) => xdp_action::XDP_PASS,
        Ok(Verdict::Dropped) => xdp_action::XDP_DROP,
        Err(reason) => {
            drop_counted(pkt, reason, ifindex, hook);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn drop_counted<P: Packet>(pkt: &P, reason: DropReason, ifindex: u32, hook: u8) {
    account::dropped(&DropKey {
        ifindex,
        reason: reason as u8,
        hook,
        _pad: [0; 2],
    });
    events::dropped(pkt, reason as u8, ifindex, hook);
}

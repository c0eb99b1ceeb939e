//! The harness itself: a lab with two hosts on one bridge can ping, and leaves nothing behind.
mod common;

use std::process::Command;

#[test]
fn two_hosts_on_a_bridge_reach_each_other_and_are_cleaned_up() {
    let names;
    {
        let mut lab = common::Lab::new("hs");
        lab.add_host(Some("10.200.0.1/24"), None);
        lab.add_host(Some("10.200.0.2/24"), None);
        let out = lab.hosts[1].cmd("ping").args(["-c", "1", "-W", "5", "10.200.0.1"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        names = [lab.switch.name.clone(), lab.hosts[0].name.clone(), lab.hosts[1].name.clone()];
    }
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} left behind");
    }
}

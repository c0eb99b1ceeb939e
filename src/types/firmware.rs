//! The node's platform firmware as the installer sees it (`/sys/firmware/efi`): BIOS or UEFI.
//! Shared by the installer (`--firmware`, the boot loader it installs), the plan it asks for
//! (`?firmware=`) and the appliance's planner (the default disk layout). Not to be confused with
//! [`crate::dhcp::classify::BootStage`], which says which boot program sent a DHCP request.

use serde::{Deserialize, Serialize};

/// Firmware of a node. Spelled `bios`/`uefi` on the command line, in the plan query and in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[clap(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS.
    Bios,
    /// UEFI.
    Uefi,
}

impl Firmware {
    /// `bios` or `uefi`: the spelling of the flag, the query and the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

impl std::fmt::Display for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn one_spelling_on_the_command_line_in_queries_and_json() {
        for (fw, s) in [(Firmware::Bios, "bios"), (Firmware::Uefi, "uefi")] {
            assert_eq!(fw.as_str(), s);
            assert_eq!(Firmware::from_str(s, false), Ok(fw));
            assert_eq!(serde_json::to_string(&fw).unwrap(), format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<Firmware>(&format!("\"{s}\"")).unwrap(), fw);
        }
        assert!(Firmware::from_str("amiga", false).is_err());
        assert!(Firmware::from_str("UEFI", false).is_err(), "the spelling is lower case, as before");
    }
}

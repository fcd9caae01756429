//! `hint:` lines under an error, where the fix is obvious from what went wrong.

use mmx::Error;

/// The hint for an error, if it has one.
pub fn hint(error: &anyhow::Error) -> Option<String> {
    let error = error.downcast_ref::<Error>()?;
    let text = match error {
        Error::Device { .. } => {
            "`mmx doctor` says what this machine has; `--device cpu` (or `auto`) runs without a GPU"
                .to_string()
        }
        Error::Parameter { .. } => {
            "every parameter's range and default: the parameter table in the README (`mmx merge` section)"
                .to_string()
        }
        Error::Registry { path, message }
            if message.starts_with("no tag") || message.starts_with("no manifest") =>
        {
            format!(
                "`mmx ls --registry {}` lists what that registry holds; `mmx pull --from REMOTE` brings a tag from a remote one",
                path.display()
            )
        }
        Error::Header { .. } => {
            "the file is not a whole safetensors file: a download cut short is the usual cause; `mmx verify` checks a registry's copies"
                .to_string()
        }
        Error::Io { path, source }
            if source.kind() == std::io::ErrorKind::NotFound && path.is_relative() =>
        {
            "relative paths in a recipe are read from the recipe's own directory, not the current one"
                .to_string()
        }
        _ => return None,
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_with_an_obvious_fix_get_a_hint_and_others_none() {
        let device = anyhow::Error::from(Error::Device {
            message: "libcuda is not installed".into(),
        });
        assert!(hint(&device).unwrap().contains("mmx doctor"));
        let missing = anyhow::Error::from(Error::Registry {
            path: "team/registry".into(),
            message: "no tag cardiology:v9".into(),
        });
        assert!(hint(&missing)
            .unwrap()
            .contains("mmx ls --registry team/registry"));
        let other = anyhow::Error::from(Error::Registry {
            path: "r".into(),
            message: "lock held".into(),
        });
        assert_eq!(hint(&other), None);
        assert_eq!(hint(&anyhow::anyhow!("plain")), None);
    }
}

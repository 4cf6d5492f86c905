//! Limits of one model, set per model on the command line: how many threads its steps run on, how
//! many of its requests generate at once, and how long its context may be. A model without limits
//! of its own gets the server's.

use berth_store::Reference;

/// What one model may use; `None` leaves the server's setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelLimits {
    /// Worker threads of the model's own: its steps run beside other models' instead of taking
    /// turns with them on the shared workers.
    pub threads: Option<usize>,
    /// Requests generating at once (the rest wait in its queue).
    pub max_running: Option<usize>,
    /// Tokens of context (prompt and answer), at most the model's own.
    pub context: Option<usize>,
}

/// The limits given for each model, by the model's full reference.
#[derive(Debug, Clone, Default)]
pub struct LimitsByModel(Vec<(String, ModelLimits)>);

impl LimitsByModel {
    /// The limits of `reference`, if any were given.
    pub fn of(&self, reference: &Reference) -> ModelLimits {
        let reference = reference.to_string();
        self.0.iter().find(|(r, _)| *r == reference).map(|(_, l)| l.clone()).unwrap_or_default()
    }

    /// Parse `REF=threads:2,max-running:8,context:4096` (any of the three, in any order).
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let usage =
            "write REF=threads:N,max-running:N,context:N (any of them), e.g. ai/smollm2=max-running:8,context:2048";
        let (reference, settings) = spec.split_once('=').ok_or_else(|| format!("`{spec}`: {usage}"))?;
        let reference = Reference::parse(reference.trim())
            .map_err(|e| format!("`{reference}` is not a model reference: {e}"))?
            .to_string();
        let mut limits = ModelLimits::default();
        for setting in settings.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = setting.split_once(':').ok_or_else(|| format!("`{setting}`: {usage}"))?;
            let number = |max: usize| -> Result<Option<usize>, String> {
                match value.trim().parse::<usize>() {
                    Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
                    _ => Err(format!("{name} must be a whole number from 1 to {max}, got `{value}`")),
                }
            };
            match name.trim() {
                "threads" => limits.threads = number(1024)?,
                "max-running" => limits.max_running = number(4096)?,
                "context" => limits.context = number(1 << 24)?,
                other => return Err(format!("unknown limit `{other}`; {usage}")),
            }
        }
        if limits == ModelLimits::default() {
            return Err(format!("`{spec}` sets no limit; {usage}"));
        }
        if self.0.iter().any(|(r, _)| *r == reference) {
            return Err(format!("{reference} has limits twice; give them in one --limit"));
        }
        self.0.push((reference, limits));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_per_model_and_refuse_nonsense() {
        let mut all = LimitsByModel::default();
        all.add("ai/smollm2=threads:1, max-running:4,context:512").unwrap();
        let of = |r: &str| all.of(&Reference::parse(r).unwrap());
        let l = of("ai/smollm2:latest");
        assert_eq!((l.threads, l.max_running, l.context), (Some(1), Some(4), Some(512)));
        assert_eq!(of("ai/other"), ModelLimits::default());
        for bad in [
            "ai/smollm2",
            "ai/smollm2=",
            "ai/smollm2=threads",
            "ai/smollm2=threads:0",
            "ai/smollm2=threads:-1",
            "ai/smollm2=speed:9",
            "ai/smollm2=context:99999999999",
            "Bad Name=threads:1",
            "ai/smollm2:latest=threads:2",
        ] {
            assert!(all.add(bad).is_err(), "{bad} was accepted");
        }
    }
}

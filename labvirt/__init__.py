"""labvirt: disposable, isolated Linux environments on KubeVirt for interactive learning."""

package peft

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/tensors"

	"peft/peft/atomicfile"
	"peft/peft/safetensors"
)

// File names of a saved method state.
const (
	// ConfigFile holds the method's name and configuration as JSON.
	ConfigFile = "peft_config.json"
	// StateFile holds the method's tensors in safetensors format, named by GoMLX scope and name.
	StateFile = "peft_state.safetensors"
)

// stateFormatVersion is bumped when the saved layout changes incompatibly.
const stateFormatVersion = 1

// savedConfig is the content of ConfigFile.
type savedConfig struct {
	FormatVersion int             `json:"format_version"`
	Method        string          `json:"method"`
	Config        json.RawMessage `json:"config"`
	Tensors       int             `json:"tensors"`
	// StateSHA256 is the hash of StateFile: Load refuses tensors that are not the ones this
	// configuration was saved with (a save interrupted between the two files).
	StateSHA256 string `json:"state_sha256"`
}

// Save writes exactly the method's own state (its State variables) and its configuration to the
// folder dir, creating it if needed. Each file is written to a temporary file and renamed into
// place, the tensors first and the configuration last, so an interrupted save never leaves a
// configuration that points to missing or half-written tensors.
func (m *Model) Save(dir string) error {
	if m.method == nil {
		return errors.New("peft.Model.Save: the model has no method to save")
	}
	if m.Merged() {
		return fmt.Errorf("peft.Model.Save: %w", ErrMerged)
	}
	cfgJSON, err := json.Marshal(m.method.Config())
	if err != nil {
		return fmt.Errorf("peft.Model.Save: encoding the %s config: %w", m.method.Name(), err)
	}
	vars := m.method.State(m.ctx)
	tensorsOut := make([]safetensors.Tensor, 0, len(vars))
	for _, v := range vars {
		value, err := v.Value()
		if err != nil {
			return fmt.Errorf("peft.Model.Save: reading %s: %w", v.ScopeAndName(), err)
		}
		st, err := safetensors.FromGoMLX(v.ScopeAndName(), value)
		if err != nil {
			return fmt.Errorf("peft.Model.Save: %w", err)
		}
		tensorsOut = append(tensorsOut, st)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("peft.Model.Save: %w", err)
	}
	state, err := safetensors.Encode(tensorsOut, map[string]string{"method": m.method.Name()})
	if err != nil {
		return fmt.Errorf("peft.Model.Save: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, StateFile), state); err != nil {
		return fmt.Errorf("peft.Model.Save: %w", err)
	}
	hash := sha256.Sum256(state)
	saved, err := json.MarshalIndent(savedConfig{
		FormatVersion: stateFormatVersion, Method: m.method.Name(), Config: cfgJSON, Tensors: len(tensorsOut),
		StateSHA256: hex.EncodeToString(hash[:]),
	}, "", "  ")
	if err != nil {
		return fmt.Errorf("peft.Model.Save: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, ConfigFile), append(saved, '\n')); err != nil {
		return fmt.Errorf("peft.Model.Save: %w", err)
	}
	return nil
}

// ReadConfig reads the method name and configuration saved in dir, decoding the configuration
// into config (a pointer to the method's Config type), so the method can be rebuilt before Load.
func ReadConfig(dir string, config any) (method string, err error) {
	saved, err := readSavedConfig(dir)
	if err != nil {
		return "", err
	}
	if err := json.Unmarshal(saved.Config, config); err != nil {
		return "", fmt.Errorf("peft.ReadConfig: %s config in %s: %w", saved.Method, dir, err)
	}
	return saved.Method, nil
}

func readSavedConfig(dir string) (*savedConfig, error) {
	data, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if err != nil {
		return nil, fmt.Errorf("peft: no saved method state in %s: %w", dir, err)
	}
	var saved savedConfig
	if err := json.Unmarshal(data, &saved); err != nil {
		return nil, fmt.Errorf("peft: %s is corrupt: %w", filepath.Join(dir, ConfigFile), err)
	}
	if saved.FormatVersion != stateFormatVersion || saved.Method == "" {
		return nil, fmt.Errorf("peft: %s: unsupported format version %d or no method name",
			filepath.Join(dir, ConfigFile), saved.FormatVersion)
	}
	return &saved, nil
}

// Load reads a state written by Save into the model's method. The method must be of the same
// kind and configuration, and every tensor must be present with the shape the model expects:
// everything is checked before any variable changes, so a failed load leaves the model as it
// was.
func (m *Model) Load(dir string) error {
	if m.method == nil {
		return errors.New("peft.Model.Load: the model has no method to load into")
	}
	if m.Merged() {
		return fmt.Errorf("peft.Model.Load: %w", ErrMerged)
	}
	saved, err := readSavedConfig(dir)
	if err != nil {
		return err
	}
	if saved.Method != m.method.Name() {
		return fmt.Errorf("peft.Model.Load: %s holds a %s state, the model uses %s", dir, saved.Method, m.method.Name())
	}
	current, err := json.Marshal(m.method.Config())
	if err != nil {
		return fmt.Errorf("peft.Model.Load: %w", err)
	}
	if !jsonEqual(current, saved.Config) {
		var compact bytes.Buffer
		if json.Compact(&compact, saved.Config) == nil {
			saved.Config = compact.Bytes()
		}
		return fmt.Errorf("peft.Model.Load: the %s config saved in %s differs from the model's: saved %s, model %s",
			saved.Method, dir, saved.Config, current)
	}
	statePath := filepath.Join(dir, StateFile)
	state, err := os.ReadFile(statePath)
	if err != nil {
		return fmt.Errorf("peft.Model.Load: %w", err)
	}
	if hash := sha256.Sum256(state); hex.EncodeToString(hash[:]) != saved.StateSHA256 {
		return fmt.Errorf("peft.Model.Load: %s is not the state %s was saved with (its SHA-256 differs: a damaged file or an interrupted save)",
			statePath, ConfigFile)
	}
	file, err := safetensors.Parse(state)
	if err != nil {
		return fmt.Errorf("peft.Model.Load: %s: %w", statePath, err)
	}
	vars := m.method.State(m.ctx)
	if len(file.Tensors) != len(vars) || saved.Tensors != len(vars) {
		return fmt.Errorf("peft.Model.Load: %s has %d tensors, the model's %s state has %d",
			dir, len(file.Tensors), saved.Method, len(vars))
	}
	values := make([]*tensors.Tensor, len(vars))
	for i, v := range vars {
		st, found := file.Get(v.ScopeAndName())
		if !found {
			return fmt.Errorf("peft.Model.Load: tensor %s is missing from %s", v.ScopeAndName(), dir)
		}
		if !slices.Equal(st.Shape, v.Shape().Dimensions) {
			return fmt.Errorf("peft.Model.Load: tensor %s has shape %v in %s, the model expects %v",
				v.ScopeAndName(), st.Shape, dir, v.Shape().Dimensions)
		}
		t, err := st.ToGoMLX()
		if err != nil {
			return fmt.Errorf("peft.Model.Load: %w", err)
		}
		if t.DType() != v.DType() {
			return fmt.Errorf("peft.Model.Load: tensor %s is %s in %s, the model expects %s",
				v.ScopeAndName(), t.DType(), dir, v.DType())
		}
		values[i] = t
	}
	for i, v := range vars {
		if err := v.SetValue(values[i]); err != nil {
			return fmt.Errorf("peft.Model.Load: setting %s: %w", v.ScopeAndName(), err)
		}
	}
	return nil
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return bytes.Equal(a, b)
	}
	ja, _ := json.Marshal(x)
	jb, _ := json.Marshal(y)
	return bytes.Equal(ja, jb)
}

package peft

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft/atomicfile"
	"peft/peft/safetensors"
)

// File names of this SDK's own layout, for the methods Hugging Face PEFT does not have.
const (
	// ConfigFile holds the method's name and configuration as JSON.
	ConfigFile = "peft_config.json"
	// StateFile holds the method's tensors in safetensors format, named by GoMLX scope and name
	// (bottleneck adapters).
	StateFile = "peft_state.safetensors"
	// ModelWeightsFile and ModelConfigFile make the folder of a full fine-tune a Hugging Face
	// model folder: the whole model under Hugging Face names, and the base model's config.json.
	ModelWeightsFile = "model.safetensors"
	ModelConfigFile  = "config.json"
)

// stateFormatVersion is bumped when the saved layout changes incompatibly.
const stateFormatVersion = 1

// tensorNamesHF marks a state file whose tensors carry Hugging Face names (HFName) in PyTorch's
// layout; without it they carry GoMLX scope names in GoMLX's layout.
const tensorNamesHF = "hf"

// savedConfig is the content of ConfigFile, and of the metadata record Save puts in a PEFT
// adapter file (where AdapterConfigSHA256 replaces StateSHA256).
type savedConfig struct {
	FormatVersion int             `json:"format_version"`
	Method        string          `json:"method"`
	Config        json.RawMessage `json:"config"`
	Tensors       int             `json:"tensors"`
	// StateSHA256 is the hash of the state file: Load refuses tensors that are not the ones this
	// configuration was saved with (a save interrupted between the two files).
	StateSHA256 string `json:"state_sha256,omitempty"`
	// StateFile names the state file when it is not StateFile; TensorNames says how its tensors
	// are named ("" for GoMLX names, tensorNamesHF).
	StateFile   string `json:"state_file,omitempty"`
	TensorNames string `json:"tensor_names,omitempty"`
	// BaseModel identifies the base the state was trained on.
	BaseModel *savedBase `json:"base_model,omitempty"`
	// AdapterConfigSHA256 is the digest (configDigest) of the adapter_config.json written with a
	// PEFT adapter file.
	AdapterConfigSHA256 string `json:"adapter_config_sha256,omitempty"`
}

// savedBase identifies a base model: its name or path, and the fingerprint of the weights the
// method does not save (see Model.BaseFingerprint).
type savedBase struct {
	NameOrPath  string `json:"name_or_path,omitempty"`
	Fingerprint string `json:"fingerprint,omitempty"`
}

func (m *Model) savedBase() *savedBase {
	b := &savedBase{NameOrPath: BaseModelOf(m.ctx).NameOrPath, Fingerprint: m.fingerprint}
	if *b == (savedBase{}) {
		return nil
	}
	return b
}

// Save writes the method's state to the folder dir, creating it if needed.
//
// Methods Hugging Face PEFT has (LoRA, AdaLoRA, QLoRA, prompt tuning; PEFTFormat) are written as a
// PEFT adapter folder, adapter_config.json and adapter_model.safetensors, that PEFT, vLLM and
// Ollama load. What PEFT has no field for (the SDK's own configuration with its seed, the base
// model's fingerprint) is kept in the safetensors metadata, which they ignore.
//
// Other methods are written in this SDK's layout: peft_config.json (method, configuration, base
// model) and the tensors. Full fine-tuning, whose state is the whole model, is written as a
// Hugging Face model folder (model.safetensors with Hugging Face names, and the base model's
// config.json when known) that transformers loads; bottleneck adapters as peft_state.safetensors.
//
// The folder's files are replaced as one change (atomicfile.WriteFiles): a save killed at any
// instant leaves the previous save or the new one, and Load completes a save that was cut short
// after its commit. The configuration also pins the tensors it belongs to, so a folder mixed by
// other means is detected.
func (m *Model) Save(dir string) error {
	m.state.Lock()
	defer m.state.Unlock()
	return m.save(dir)
}

// save is Save with the state lock held.
func (m *Model) save(dir string) error {
	if m.method == nil {
		return errors.New("peft.Model.Save: the model has no method to save")
	}
	if m.isMerged() {
		return fmt.Errorf("peft.Model.Save: %w", ErrMerged)
	}
	cfgJSON, err := json.Marshal(m.method.Config())
	if err != nil {
		return fmt.Errorf("peft.Model.Save: encoding the %s config: %w", m.method.Name(), err)
	}
	if f, ok := m.method.(PEFTFormat); ok {
		err = m.savePEFT(dir, f, cfgJSON)
	} else {
		err = m.saveOwn(dir, cfgJSON)
	}
	if err != nil {
		return fmt.Errorf("peft.Model.Save: %w", err)
	}
	return nil
}

func (m *Model) savePEFT(dir string, f PEFTFormat, cfgJSON []byte) error {
	fields, err := f.PEFTConfig(m.ctx)
	if err != nil {
		return err
	}
	out, err := f.PEFTTensors(m.ctx)
	if err != nil {
		return err
	}
	a := PEFTAdapter{PEFTType: f.PEFTType(), Fields: fields, Tensors: out, Task: m.layout.Task,
		Method: m.method.Name(), Config: cfgJSON}
	if base := m.savedBase(); base != nil {
		a.BaseModel, a.BaseFingerprint = base.NameOrPath, base.Fingerprint
	}
	return WritePEFTFolder(dir, a)
}

// PEFTAdapter is an adapter in Hugging Face PEFT's layout, as WritePEFTFolder writes it.
type PEFTAdapter struct {
	// PEFTType and Fields are its adapter_config.json: peft_type and the method's fields
	// (PEFTFormat.PEFTConfig); WritePEFTFolder adds task_type, base_model_name_or_path, revision,
	// inference_mode and auto_mapping.
	PEFTType string
	Fields   map[string]any
	// Tensors are adapter_model.safetensors' tensors, under PEFT's keys.
	Tensors []safetensors.Tensor
	// Task is the task_type ("" for null); BaseModel the base_model_name_or_path ("" for null).
	Task      TaskType
	BaseModel string
	// Method and Config are this SDK's method name and configuration (JSON), recorded in the
	// tensors' metadata so that Load and package methods rebuild the method exactly ("": a plain
	// PEFT folder). BaseFingerprint is recorded with them (Model.BaseFingerprint): Load then
	// refuses other base weights.
	Method          string
	Config          json.RawMessage
	BaseFingerprint string
}

// WritePEFTFolder writes a as a PEFT adapter folder in dir: adapter_config.json as PEFT writes it
// and adapter_model.safetensors with metadata {"format": "pt"} (and this SDK's record when
// a.Method is set), replacing what dir held as one change (atomicfile.WriteFiles), so a write
// killed at any instant leaves the old adapter or the new. Model.Save writes through it; so do
// tools that make adapters without a model (package lora/combine).
func WritePEFTFolder(dir string, a PEFTAdapter) error {
	fields := maps.Clone(a.Fields)
	fields["peft_type"] = a.PEFTType
	fields["base_model_name_or_path"] = nilIfEmpty(a.BaseModel)
	fields["revision"] = nil
	fields["task_type"] = nilIfEmpty(string(a.Task))
	fields["inference_mode"] = true
	fields["auto_mapping"] = nil
	adapterConfig, err := encodePEFTConfig(fields)
	if err != nil {
		return err
	}
	metadata := map[string]string{"format": "pt"}
	if a.Method != "" {
		digest, err := configDigest(adapterConfig)
		if err != nil {
			return err
		}
		saved := savedConfig{FormatVersion: stateFormatVersion, Method: a.Method, Config: a.Config, Tensors: len(a.Tensors),
			AdapterConfigSHA256: digest}
		if base := (savedBase{NameOrPath: a.BaseModel, Fingerprint: a.BaseFingerprint}); base != (savedBase{}) {
			saved.BaseModel = &base
		}
		record, err := json.Marshal(saved)
		if err != nil {
			return err
		}
		metadata[metadataRecord] = string(record)
	}
	weights, err := safetensors.Encode(a.Tensors, metadata)
	if err != nil {
		return err
	}
	return atomicfile.WriteFiles(dir, []atomicfile.File{{Name: AdapterWeightsFile, Data: weights}, {Name: AdapterConfigFile, Data: adapterConfig}},
		ConfigFile, StateFile) // the other layout's files, from an earlier save
}

func (m *Model) saveOwn(dir string, cfgJSON []byte) error {
	vars := m.method.State(m.ctx)
	saved := savedConfig{FormatVersion: stateFormatVersion, Method: m.method.Name(), Config: cfgJSON,
		Tensors: len(vars), BaseModel: m.savedBase()}
	var out []safetensors.Tensor
	metadata := map[string]string{"method": m.method.Name()}
	whole := m.stateIsBase(vars)
	if whole {
		var err error
		if out, err = HFTensors("", vars); err != nil {
			return err
		}
		saved.StateFile, saved.TensorNames = ModelWeightsFile, tensorNamesHF
		saved.BaseModel = nil // the state is the whole model
		metadata = map[string]string{"format": "pt"}
	} else {
		for _, v := range vars {
			value, err := v.Value()
			if err != nil {
				return fmt.Errorf("reading %s: %w", v.ScopeAndName(), err)
			}
			st, err := safetensors.FromGoMLX(v.ScopeAndName(), value)
			if err != nil {
				return err
			}
			out = append(out, st)
		}
	}
	state, err := safetensors.Encode(out, metadata)
	if err != nil {
		return err
	}
	stateFile := StateFile
	if saved.StateFile != "" {
		stateFile = saved.StateFile
	}
	files := []atomicfile.File{{Name: stateFile, Data: state}}
	if base := BaseModelOf(m.ctx); whole && len(base.Config) > 0 {
		files = append(files, atomicfile.File{Name: ModelConfigFile, Data: base.Config})
	}
	hash := sha256.Sum256(state)
	saved.StateSHA256 = hex.EncodeToString(hash[:])
	data, err := json.MarshalIndent(saved, "", "  ")
	if err != nil {
		return err
	}
	files = append(files, atomicfile.File{Name: ConfigFile, Data: append(data, '\n')})
	return atomicfile.WriteFiles(dir, files, AdapterConfigFile, AdapterWeightsFile) // the PEFT layout's, from an earlier save
}

// stateIsBase reports whether the state is exactly the base model's variables: the state is then
// the model itself (full fine-tuning), saved as a Hugging Face model.
func (m *Model) stateIsBase(vars []*context.Variable) bool {
	state := map[*context.Variable]bool{}
	for _, v := range vars {
		state[v] = true
	}
	if len(state) != len(vars) || len(vars) != len(m.layout.BaseVariables) {
		return false
	}
	for _, v := range m.layout.BaseVariables {
		if !state[v] {
			return false
		}
	}
	return true
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// ReadConfig reads the method name and configuration saved in dir in this SDK's layout (or by
// this SDK in PEFT's), decoding the configuration into config (a pointer to the method's Config
// type), so the method can be rebuilt before Load. Folders PEFT wrote have no such configuration:
// use package methods, which builds the method from adapter_config.json.
func ReadConfig(dir string, config any) (method string, err error) {
	saved, err := ReadAdapter(dir)
	if err != nil {
		return "", err
	}
	if saved.Method == "" {
		return "", fmt.Errorf("peft.ReadConfig: %s was not written by this SDK (it has no configuration of ours); build the method from its %s (package methods does)",
			saved.Dir, AdapterConfigFile)
	}
	if err := json.Unmarshal(saved.Config, config); err != nil {
		return "", fmt.Errorf("peft.ReadConfig: %s config in %s: %w", saved.Method, saved.Dir, err)
	}
	return saved.Method, nil
}

// SavedAdapter is what a saved folder says about the method that wrote it (ReadAdapter).
type SavedAdapter struct {
	// Dir is the folder holding the adapter (a sub-folder of the one asked for, see FindAdapter).
	Dir string
	// Format is its layout.
	Format Format
	// Method and Config are the SDK's method name and configuration (JSON) when this SDK wrote the
	// folder: always in FormatOwn; in FormatPEFT when the adapter file carries our record.
	Method string
	Config json.RawMessage
	// Fields is the PEFT configuration (FormatPEFT only).
	Fields *PEFTFields
	// BaseFingerprint is the fingerprint of the base model's weights the adapter was trained on
	// (Model.BaseFingerprint) when this SDK recorded one.
	BaseFingerprint string
}

// ReadAdapter finds the adapter in dir (FindAdapter, with the sub-folder AdapterName gives) and
// reads what it says about its method, checking that its configuration and tensors belong
// together (AsPlainPEFT: reading a PEFT folder by its adapter_config.json alone).
func ReadAdapter(dir string, opts ...LoadOption) (*SavedAdapter, error) {
	o := loadOptionsOf(opts)
	folder, format, err := FindAdapter(dir, o.adapterName)
	if err != nil {
		return nil, err
	}
	saved := &SavedAdapter{Dir: folder, Format: format}
	if format == FormatOwn {
		cfg, err := readSavedConfig(folder)
		if err != nil {
			return nil, err
		}
		saved.Method, saved.Config = cfg.Method, cfg.Config
		if cfg.BaseModel != nil {
			saved.BaseFingerprint = cfg.BaseModel.Fingerprint
		}
		return saved, nil
	}
	if saved.Fields, err = ReadPEFTFields(folder); err != nil {
		return nil, err
	}
	if err := checkAdapterWeights(folder); err != nil {
		return nil, err
	}
	metadata, err := readMetadata(filepath.Join(folder, AdapterWeightsFile))
	if err != nil {
		return nil, err
	}
	record, err := ourRecord(metadata, saved.Fields, o.plainPEFT)
	if err != nil {
		return nil, err
	}
	if record != nil {
		saved.Method, saved.Config = record.Method, record.Config
		if record.BaseModel != nil {
			saved.BaseFingerprint = record.BaseModel.Fingerprint
		}
	}
	return saved, nil
}

// checkAdapterWeights errs if a PEFT folder has no adapter_model.safetensors, saying so when it
// has the pickle PEFT writes without safetensors.
func checkAdapterWeights(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, AdapterWeightsFile)); errors.Is(err, os.ErrNotExist) {
		if _, err := os.Stat(filepath.Join(dir, adapterPickleFile)); err == nil {
			return fmt.Errorf("peft: %s has only %s, a Python pickle (which can run code when read): convert it to %s in Python (PeftModel.save_pretrained(dir, safe_serialization=True))",
				dir, adapterPickleFile, AdapterWeightsFile)
		}
		return fmt.Errorf("peft: %s is missing from %s", AdapterWeightsFile, dir)
	}
	return nil
}

// readAdapterWeights reads a PEFT folder's adapter_model.safetensors.
func readAdapterWeights(dir string) (*safetensors.File, error) {
	if err := checkAdapterWeights(dir); err != nil {
		return nil, err
	}
	if err := checkRegular(filepath.Join(dir, AdapterWeightsFile)); err != nil {
		return nil, err
	}
	file, err := safetensors.Read(filepath.Join(dir, AdapterWeightsFile))
	if err != nil {
		return nil, fmt.Errorf("peft: %w", err)
	}
	return file, nil
}

// ourRecord returns the record Save keeps in a PEFT adapter file's metadata, or nil if there is
// none (PEFT wrote the folder) or plain is set (AsPlainPEFT). A record saved with another adapter
// configuration than the folder's is an error: a save interrupted between the two files, or
// adapter_config.json edited in a field that changes the adapter.
func ourRecord(metadata map[string]string, fields *PEFTFields, plain bool) (*savedConfig, error) {
	raw, ok := metadata[metadataRecord]
	if !ok || plain {
		return nil, nil
	}
	var record savedConfig
	if err := json.Unmarshal([]byte(raw), &record); err != nil || record.Method == "" {
		return nil, fmt.Errorf("peft: the %q metadata of %s is corrupt", metadataRecord, AdapterWeightsFile)
	}
	digest, err := configDigest(fields.data)
	if err != nil {
		return nil, err
	}
	if record.AdapterConfigSHA256 != digest {
		return nil, fmt.Errorf("peft: %s is not the configuration %s was saved with (an interrupted save, or the file was edited in a field that changes the adapter): save again, or read the folder as a plain PEFT adapter with peft.AsPlainPEFT()",
			fields.source, AdapterWeightsFile)
	}
	return &record, nil
}

// informationalPEFTFields are adapter_config.json fields that do not change the adapter, which
// users edit before publishing one (the Hub id of the base, say).
var informationalPEFTFields = []string{"base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version"}

// configDigest is the SHA-256 (hex) of what in an adapter_config.json changes the adapter: its
// fields but the informational ones, written canonically (keys sorted, compact), so that
// reformatting, line endings and a new base_model_name_or_path do not count.
func configDigest(data []byte) (string, error) {
	var fields map[string]any
	if err := json.Unmarshal(data, &fields); err != nil {
		return "", err
	}
	for _, key := range informationalPEFTFields {
		delete(fields, key)
	}
	canonical, err := json.Marshal(fields)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(canonical)
	return hex.EncodeToString(sum[:]), nil
}

func readSavedConfig(dir string) (*savedConfig, error) {
	data, err := readBounded(filepath.Join(dir, ConfigFile), maxConfigBytes)
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
	if saved.StateFile != "" && saved.StateFile != ModelWeightsFile {
		return nil, fmt.Errorf("peft: %s: unexpected state_file %q", filepath.Join(dir, ConfigFile), saved.StateFile)
	}
	return &saved, nil
}

// LoadOption changes what Load accepts.
type LoadOption func(*loadOptions)

type loadOptions struct {
	allowOtherBase bool
	adapterName    string
	plainPEFT      bool
}

func loadOptionsOf(opts []LoadOption) loadOptions {
	var o loadOptions
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// AllowOtherBase makes Load apply an adapter saved on a base model whose weights differ from the
// model's (another checkpoint of the same architecture), instead of refusing it with ErrOtherBase.
func AllowOtherBase() LoadOption { return func(o *loadOptions) { o.allowOtherBase = true } }

// AsPlainPEFT makes Load (and ReadAdapter) read a Hugging Face PEFT folder by its
// adapter_config.json alone, as PEFT does, setting aside the record this SDK keeps in the tensors'
// metadata (its exact configuration and the base fingerprint): for a folder whose configuration
// was edited after saving.
func AsPlainPEFT() LoadOption { return func(o *loadOptions) { o.plainPEFT = true } }

// AdapterName makes Load read the adapter in the sub-folder name, where PEFT saves adapters
// other than "default".
func AdapterName(name string) LoadOption { return func(o *loadOptions) { o.adapterName = name } }

// Load reads a saved state into the model's method: a Hugging Face PEFT adapter folder (written
// by this SDK or by PEFT: F32, F16 or BF16 tensors), or this SDK's layout. dir is the folder, or
// a folder with one adapter in a sub-folder (see AdapterName).
//
// The method must be of the same kind and configuration (for PEFT folders: every field that
// changes what the adapter computes; fields we do not implement are errors naming them, fields we
// do not know are ignored with one log line), every tensor must be present with the shape the
// model expects, and no tensor may be left over (PEFT drops those silently; a typo in a key would
// give an adapter that does nothing). An adapter saved by this SDK on a base whose weights differ
// from the model's is refused (ErrOtherBase) unless AllowOtherBase is given. Everything is checked
// before any variable changes, so a failed load leaves the model as it was.
func (m *Model) Load(dir string, opts ...LoadOption) error {
	m.state.Lock()
	defer m.state.Unlock()
	if m.method == nil {
		return errors.New("peft.Model.Load: the model has no method to load into")
	}
	if m.isMerged() {
		return fmt.Errorf("peft.Model.Load: %w", ErrMerged)
	}
	o := loadOptionsOf(opts)
	folder, format, err := FindAdapter(dir, o.adapterName)
	if err == nil {
		if format == FormatPEFT {
			f, ok := m.method.(PEFTFormat)
			if !ok {
				err = fmt.Errorf("%s holds a Hugging Face PEFT adapter, which method %s cannot read", folder, m.method.Name())
			} else {
				err = m.loadPEFT(folder, f, o)
			}
		} else {
			err = m.loadOwn(folder, o)
		}
	}
	if err != nil {
		return fmt.Errorf("peft.Model.Load: %w", err)
	}
	return nil
}

func (m *Model) loadPEFT(dir string, f PEFTFormat, o loadOptions) error {
	fields, err := ReadPEFTFields(dir)
	if err != nil {
		return err
	}
	if got := fields.PEFTType(); got != f.PEFTType() {
		return fmt.Errorf("%s holds a %s adapter, the model's method %s reads %s", fields.source, got, m.method.Name(), f.PEFTType())
	}
	var task string
	if err := fields.Get("task_type", &task); err != nil {
		return err
	}
	if task != "" && m.layout.Task != "" && TaskType(task) != m.layout.Task {
		return fmt.Errorf("%s: task_type %s, the model is %s", fields.source, task, m.layout.Task)
	}
	if err := f.CheckPEFTConfig(fields); err != nil {
		return err
	}
	file, err := readAdapterWeights(dir)
	if err != nil {
		return err
	}
	record, err := ourRecord(file.Metadata, fields, o.plainPEFT)
	if err != nil {
		return err
	}
	if record != nil {
		if err := m.checkBase(record.BaseModel, dir, o); err != nil {
			return err
		}
	}
	tf := newPEFTTensorFile(file, filepath.Join(dir, AdapterWeightsFile))
	values, err := f.PEFTValues(m.ctx, fields, tf)
	if err != nil {
		return err
	}
	if left := tf.left(); len(left) > 0 {
		return fmt.Errorf("%s has tensors the model's %s adapter does not have (a misspelled key, or another model's layers): %s",
			tf.source, m.method.Name(), truncateText(fmt.Sprint(left), 400))
	}
	if err := m.setState(f.State(m.ctx), values, dir); err != nil {
		return err
	}
	if unknown := fields.Unknown(); len(unknown) > 0 {
		log.Printf("peft: %s: ignored fields this SDK does not know: %v", fields.source, unknown)
	}
	return nil
}

func (m *Model) loadOwn(dir string, o loadOptions) error {
	saved, err := readSavedConfig(dir)
	if err != nil {
		return err
	}
	if saved.Method != m.method.Name() {
		return fmt.Errorf("%s holds a %s state, the model uses %s", dir, saved.Method, m.method.Name())
	}
	current, err := json.Marshal(m.method.Config())
	if err != nil {
		return err
	}
	if !jsonEqual(current, saved.Config) {
		var compact bytes.Buffer
		if json.Compact(&compact, saved.Config) == nil {
			saved.Config = compact.Bytes()
		}
		return fmt.Errorf("the %s config saved in %s differs from the model's: saved %s, model %s",
			saved.Method, dir, saved.Config, current)
	}
	if err := m.checkBase(saved.BaseModel, dir, o); err != nil {
		return err
	}
	stateName := StateFile
	if saved.StateFile != "" {
		stateName = saved.StateFile
	}
	statePath := filepath.Join(dir, stateName)
	if err := checkRegular(statePath); err != nil { // a link to /dev/zero would be read without end
		return err
	}
	state, err := os.ReadFile(statePath)
	if err != nil {
		return err
	}
	if hash := sha256.Sum256(state); hex.EncodeToString(hash[:]) != saved.StateSHA256 {
		return fmt.Errorf("%s is not the state %s was saved with (its SHA-256 differs: a damaged file or an interrupted save)",
			statePath, ConfigFile)
	}
	file, err := safetensors.Parse(state)
	if err != nil {
		return fmt.Errorf("%s: %w", statePath, err)
	}
	vars := m.method.State(m.ctx)
	if len(file.Tensors) != len(vars) || saved.Tensors != len(vars) {
		return fmt.Errorf("%s has %d tensors, the model's %s state has %d", dir, len(file.Tensors), saved.Method, len(vars))
	}
	var values []*tensors.Tensor
	if saved.TensorNames == tensorNamesHF {
		tf := newPEFTTensorFile(file, statePath)
		if values, err = HFValues("", vars, tf); err != nil {
			return err
		}
	} else {
		for _, v := range vars {
			st, found := file.Get(v.ScopeAndName())
			if !found {
				return fmt.Errorf("tensor %s is missing from %s", v.ScopeAndName(), dir)
			}
			if !slices.Equal(st.Shape, v.Shape().Dimensions) {
				return fmt.Errorf("tensor %s has shape %v in %s, the model expects %v", v.ScopeAndName(), st.Shape, dir, v.Shape().Dimensions)
			}
			t, err := st.ToGoMLX()
			if err != nil {
				return err
			}
			values = append(values, t)
		}
	}
	return m.setState(vars, values, dir)
}

// checkBase refuses a state saved on another base, unless allowed.
func (m *Model) checkBase(saved *savedBase, dir string, o loadOptions) error {
	if saved == nil || saved.Fingerprint == "" || m.fingerprint == "" || saved.Fingerprint == m.fingerprint || o.allowOtherBase {
		return nil
	}
	name := saved.NameOrPath
	if name == "" {
		name = "(unnamed)"
	}
	return fmt.Errorf("%w: %s was saved on base model %s whose weights have fingerprint %.16s…, this model's base has %.16s… (load with peft.AllowOtherBase(), or -allow-other-base in the example programs, to apply it anyway)",
		ErrOtherBase, dir, name, saved.Fingerprint, m.fingerprint)
}

// setState checks values against vars (one each, same dtype and shape) and only then sets them.
func (m *Model) setState(vars []*context.Variable, values []*tensors.Tensor, dir string) error {
	if len(values) != len(vars) {
		return fmt.Errorf("the %s method read %d tensors for a state of %d variables (a bug in the method)", m.method.Name(), len(values), len(vars))
	}
	for i, v := range vars {
		if values[i].DType() != v.DType() || !slices.Equal(values[i].Shape().Dimensions, v.Shape().Dimensions) {
			return fmt.Errorf("tensor for %s is %s in %s, the model expects %s", v.ScopeAndName(), values[i].Shape(), dir, v.Shape())
		}
	}
	for i, v := range vars {
		if err := v.SetValue(values[i]); err != nil {
			return fmt.Errorf("setting %s: %w", v.ScopeAndName(), err)
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

package peft

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft/atomicfile"
	"peft/peft/safetensors"
)

// Files of a training checkpoint, besides the adapter Model.Save writes into the same folder.
const (
	// TrainerStateFile is the checkpoint's record (JSON): step, losses, what it was made with, and
	// the caller's own state; it is written last, so a folder with it is complete.
	TrainerStateFile = "trainer_state.json"
	// TrainerTensorsFile holds every variable a run changes: the method's (trainable or not),
	// the optimizer's moments, the step counters, the random-number state.
	TrainerTensorsFile = "trainer_state.safetensors"
)

// trainerStateVersion is the version of the checkpoint layout.
const trainerStateVersion = 1

// trainerState is TrainerStateFile.
type trainerState struct {
	FormatVersion   int             `json:"format_version"`
	Step            int             `json:"global_step"`
	GradAccum       int             `json:"grad_accum"`
	Method          string          `json:"method"`
	BaseFingerprint string          `json:"base_fingerprint"`
	Losses          []float64       `json:"losses"`
	Variables       []savedVariable `json:"variables"`
	Extra           json.RawMessage `json:"extra,omitempty"`
}

type savedVariable struct {
	Name      string `json:"name"`
	Trainable bool   `json:"trainable"`
}

// runVariables are the variables of ctx a run changes: all but the frozen base weights.
func (t *Trainer) runVariables() []*context.Variable {
	trainable := map[*context.Variable]bool{}
	for _, tv := range t.model.TrainableVariables() {
		trainable[tv.Variable] = true
	}
	frozen := map[*context.Variable]bool{}
	for _, v := range t.model.layout.BaseVariables {
		if !trainable[v] {
			frozen[v] = true
		}
	}
	var out []*context.Variable
	for v := range t.model.ctx.IterVariables() {
		if !frozen[v] {
			out = append(out, v)
		}
	}
	slices.SortFunc(out, func(a, b *context.Variable) int {
		if a.ScopeAndName() < b.ScopeAndName() {
			return -1
		}
		return 1
	})
	return out
}

// SaveCheckpoint writes into dir all a run needs to continue exactly in another process: the
// adapter (Model.Save, so the folder also loads as a plain adapter), every variable the run
// changes (TrainerTensorsFile), and TrainerStateFile with the step, the losses so far and extra,
// the caller's own state (data position, evaluation history), encoded as JSON. The folder is
// replaced atomically (atomicfile.WriteDir): a crash at any moment leaves the previous
// checkpoint at dir, or none, never a partial one. Call it between Train calls.
func (t *Trainer) SaveCheckpoint(dir string, extra any) error {
	t.model.state.Lock()
	defer t.model.state.Unlock()
	if len(t.microLosses) != 0 {
		return errors.New("peft.Trainer.SaveCheckpoint: in the middle of accumulating a step")
	}
	if t.model.isMerged() {
		return ErrMerged
	}
	state := trainerState{
		FormatVersion: trainerStateVersion, Step: t.Step(), GradAccum: t.cfg.GradAccum,
		Method: t.model.methodName(), BaseFingerprint: t.model.fingerprint, Losses: t.losses,
	}
	if extra != nil {
		raw, err := json.Marshal(extra)
		if err != nil {
			return fmt.Errorf("peft.Trainer.SaveCheckpoint: extra state: %w", err)
		}
		state.Extra = raw
	}
	var out []safetensors.Tensor
	for _, v := range t.runVariables() {
		value, err := v.Value()
		if err != nil {
			return fmt.Errorf("peft.Trainer.SaveCheckpoint: %s: %w", v.ScopeAndName(), err)
		}
		tensor, err := safetensors.FromGoMLX(v.ScopeAndName(), value)
		if err != nil {
			return fmt.Errorf("peft.Trainer.SaveCheckpoint: %s: %w", v.ScopeAndName(), err)
		}
		out = append(out, tensor)
		state.Variables = append(state.Variables, savedVariable{Name: v.ScopeAndName(), Trainable: v.Trainable})
	}
	record, err := json.MarshalIndent(state, "", " ")
	if err != nil {
		return err
	}
	err = atomicfile.WriteDir(dir, func(tmp string) error {
		if err := t.model.save(tmp); err != nil {
			return err
		}
		if err := safetensors.Write(filepath.Join(tmp, TrainerTensorsFile), out, map[string]string{"format": "peft-go-trainer"}); err != nil {
			return err
		}
		return atomicfile.Write(filepath.Join(tmp, TrainerStateFile), append(record, '\n'))
	})
	if err != nil {
		return fmt.Errorf("peft.Trainer.SaveCheckpoint: %w", err)
	}
	return nil
}

// ReadCheckpoint reads the step of the checkpoint in dir and the caller's state saved with it
// into extra (if not nil), without loading anything: to check that a run may resume from it.
func ReadCheckpoint(dir string, extra any) (step int, err error) {
	if err := atomicfile.RecoverDir(dir); err != nil { // a save killed while it replaced the folder
		return 0, fmt.Errorf("peft.ReadCheckpoint: %w", err)
	}
	data, err := readBounded(filepath.Join(dir, TrainerStateFile), maxConfigBytes)
	if err != nil {
		return 0, fmt.Errorf("peft.ReadCheckpoint: %w", err)
	}
	var state trainerState
	if err := json.Unmarshal(data, &state); err != nil {
		return 0, fmt.Errorf("peft.ReadCheckpoint: %s: %w", filepath.Join(dir, TrainerStateFile), err)
	}
	if extra != nil && len(state.Extra) > 0 {
		if err := json.Unmarshal(state.Extra, extra); err != nil {
			return 0, fmt.Errorf("peft.ReadCheckpoint: %s: extra state: %w", dir, err)
		}
	}
	return state.Step, nil
}

// LoadCheckpoint restores a checkpoint SaveCheckpoint wrote into this trainer's model, which
// must be built as the run's was (same base weights, method and configuration), before or
// between Train calls; extra, if not nil, receives the caller's state. The trainer then
// continues at the checkpoint's step with its optimizer moments, random-number state and loss
// history, so the steps that follow are the ones the original run took. Every tensor is checked
// (name, dtype, shape) before anything is set; a checkpoint of another base model, method or
// accumulation is refused with an error saying which.
func (t *Trainer) LoadCheckpoint(dir string, extra any) error {
	t.model.state.Lock()
	defer t.model.state.Unlock()
	fail := func(format string, args ...any) error {
		return fmt.Errorf("peft.Trainer.LoadCheckpoint: %s: %s", dir, fmt.Sprintf(format, args...))
	}
	if err := atomicfile.RecoverDir(dir); err != nil { // a save killed while it replaced the folder
		return fail("%v", err)
	}
	data, err := readBounded(filepath.Join(dir, TrainerStateFile), maxConfigBytes)
	if err != nil {
		return fail("%v", err)
	}
	var state trainerState
	if err := json.Unmarshal(data, &state); err != nil {
		return fail("%s: %v", TrainerStateFile, err)
	}
	switch {
	case state.FormatVersion != trainerStateVersion:
		return fail("format version %d, this SDK reads %d", state.FormatVersion, trainerStateVersion)
	case state.Method != t.model.methodName():
		return fail("the checkpoint trains method %s, this model has %s", state.Method, t.model.methodName())
	case state.BaseFingerprint != t.model.fingerprint:
		return fail("%v: the checkpoint's base weights have fingerprint %.16s…, this model's %.16s…", ErrOtherBase, state.BaseFingerprint, t.model.fingerprint)
	case state.GradAccum != t.cfg.GradAccum:
		return fail("the checkpoint accumulates %d batches per step, this trainer %d", state.GradAccum, t.cfg.GradAccum)
	case state.Step > t.cfg.Steps:
		return fail("the checkpoint is at step %d, past this run's %d steps", state.Step, t.cfg.Steps)
	}
	file, err := safetensors.Read(filepath.Join(dir, TrainerTensorsFile))
	if err != nil {
		return fail("%v", err)
	}
	if len(file.Tensors) != len(state.Variables) {
		return fail("%s has %d tensors, %s lists %d variables", TrainerTensorsFile, len(file.Tensors), TrainerStateFile, len(state.Variables))
	}
	values := make([]*tensors.Tensor, len(state.Variables))
	existing := make([]*context.Variable, len(state.Variables))
	saved := map[string]bool{}
	for i, sv := range state.Variables {
		tensor, ok := file.Get(sv.Name)
		if !ok {
			return fail("%s has no tensor %s", TrainerTensorsFile, sv.Name)
		}
		if values[i], err = tensor.ToGoMLX(); err != nil {
			return fail("tensor %s: %v", sv.Name, err)
		}
		scope, name := splitScopeAndName(sv.Name)
		saved[sv.Name] = true
		if v := t.model.ctx.GetVariableByScopeAndName(scope, name); v != nil {
			if v.Shape().DType != values[i].DType() || !slices.Equal(v.Shape().Dimensions, values[i].Shape().Dimensions) {
				return fail("tensor %s is %s, the model's variable is %s", sv.Name, values[i].Shape(), v.Shape())
			}
			existing[i] = v
		}
	}
	for _, tv := range t.model.TrainableVariables() {
		if !saved[tv.Variable.ScopeAndName()] {
			return fail("the model's trainable variable %s is not in the checkpoint", tv.Variable.ScopeAndName())
		}
	}
	for i, sv := range state.Variables {
		if existing[i] != nil {
			if err := existing[i].SetValue(values[i]); err != nil {
				return fail("setting %s: %v", sv.Name, err)
			}
			continue
		}
		scope, name := splitScopeAndName(sv.Name)
		t.model.ctx.InAbsPath(scope).Checked(false).VariableWithValue(name, values[i]).SetTrainable(sv.Trainable)
	}
	t.losses = slices.Clone(state.Losses)
	t.microLosses = nil
	if extra != nil && len(state.Extra) > 0 {
		if err := json.Unmarshal(state.Extra, extra); err != nil {
			return fail("extra state: %v", err)
		}
	}
	return nil
}

// splitScopeAndName splits a variable's ScopeAndName ("/a/b/name") into its scope and name.
func splitScopeAndName(s string) (scope, name string) {
	i := len(s) - 1
	for i >= 0 && s[i] != context.ScopeSeparator[0] {
		i--
	}
	scope, name = s[:i], s[i+1:]
	if scope == "" {
		scope = context.RootScope
	}
	return scope, name
}

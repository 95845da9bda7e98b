package peft

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"time"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gomlx/pkg/ml/train"
	"github.com/gomlx/gomlx/pkg/ml/train/metrics"
	"github.com/gomlx/gomlx/pkg/ml/train/optimizers"
	"github.com/gomlx/gomlx/ui/commandline"
	"golang.org/x/term"

	"peft/peft/gemmgrad"
)

// Progress says how training reports progress.
type Progress int

const (
	// ProgressAuto shows GoMLX's progress bar when stdout is a terminal and plain log lines
	// otherwise (the bar's cursor escapes would garble logs).
	ProgressAuto Progress = iota
	// ProgressLines logs a plain line every TrainConfig.LogEvery steps.
	ProgressLines
	// ProgressBar always shows GoMLX's progress bar.
	ProgressBar
	// ProgressOff reports nothing.
	ProgressOff
)

// TrainConfig configures a Trainer. Zero fields take the documented defaults.
type TrainConfig struct {
	// Steps is the total number of optimizer steps; the schedule decays over it. Required.
	Steps int
	// LearningRate is the peak learning rate. Default 1e-3.
	LearningRate float64
	// WarmupSteps of linear warmup from 0. Default 0.
	WarmupSteps int
	// Decay after warmup. Default LinearDecay.
	Decay Decay
	// MinLRRatio is the final learning rate as a share of the peak. Default 0.
	MinLRRatio float64
	// Beta1, Beta2 and Epsilon of Adam. Defaults 0.9, 0.999, 1e-8.
	Beta1, Beta2, Epsilon float64
	// WeightDecay is AdamW's decoupled weight decay. Default 0.
	WeightDecay float64
	// ClipNorm clips the global gradient norm. Default 1.0; negative disables clipping.
	ClipNorm float64
	// DivergenceFactor stops training, before the step is applied, when a step's loss is over
	// this many times its running average, or 1 if larger (AdamW.DivergenceFactor). Default 100; negative
	// disables the check.
	DivergenceFactor float64
	// MaxUpdateRatio stops training, before the step is applied, when an update's norm would be
	// over this many times the norm of the trained weights (AdamW.MaxUpdateRatio): a learning
	// rate far too high (the weights' norm counts at least 0.01 per value). Default 100; negative
	// disables the check.
	MaxUpdateRatio float64
	// GradAccum is the number of batches whose gradients make one step (see AdamW.Accumulate):
	// a step on K batches of B rows equals one on a batch of K·B rows. Steps count steps, not
	// batches. Default 1. Methods that watch gradients (AdaLoRA) need 1.
	GradAccum int
	// Loss is the task loss (CrossEntropy, NextTokenLoss, MultiTask, …). Required.
	Loss LossFn
	// Accuracy adds classification accuracy (argmax of predictions[0] against labels[0], shaped
	// [batch, 1]) to evaluation.
	Accuracy bool
	// Seed seeds the random numbers of training (dropout): a model whose context has no
	// random-number state yet gets one from it, so that runs repeat. Default 0.
	Seed int64
	// Progress mode. Default ProgressAuto.
	Progress Progress
	// LogEvery is the number of steps between log lines. Default Steps/10 (at least 1).
	LogEvery int
	// Output is where log lines go. Default os.Stdout.
	Output io.Writer
}

// withDefaults returns the config with defaults filled in, or an error naming a bad field.
func (c TrainConfig) withDefaults() (TrainConfig, error) {
	if c.Steps <= 0 {
		return c, fmt.Errorf("peft.TrainConfig: Steps must be > 0, got %d", c.Steps)
	}
	if c.Loss == nil {
		return c, fmt.Errorf("peft.TrainConfig: Loss is required (e.g. peft.CrossEntropy or peft.NextTokenLoss)")
	}
	if c.LearningRate == 0 {
		c.LearningRate = 1e-3
	}
	if !(c.LearningRate > 0) || math.IsInf(c.LearningRate, 0) {
		return c, fmt.Errorf("peft.TrainConfig: LearningRate must be > 0, got %g", c.LearningRate)
	}
	if c.Decay == "" {
		c.Decay = LinearDecay
	}
	if c.Beta1 == 0 {
		c.Beta1 = 0.9
	}
	if c.Beta2 == 0 {
		c.Beta2 = 0.999
	}
	if c.Epsilon == 0 {
		c.Epsilon = 1e-8
	}
	if !(c.Beta1 >= 0 && c.Beta1 < 1 && c.Beta2 >= 0 && c.Beta2 < 1) {
		return c, fmt.Errorf("peft.TrainConfig: Adam betas must be in [0, 1), got %g, %g", c.Beta1, c.Beta2)
	}
	if !(c.Epsilon > 0) || math.IsInf(c.Epsilon, 0) {
		return c, fmt.Errorf("peft.TrainConfig: Epsilon must be > 0 and finite, got %g", c.Epsilon)
	}
	if math.IsNaN(c.ClipNorm) {
		return c, fmt.Errorf("peft.TrainConfig: ClipNorm must be a number, got %g", c.ClipNorm)
	}
	if !(c.WeightDecay >= 0) {
		return c, fmt.Errorf("peft.TrainConfig: WeightDecay must be ≥ 0, got %g", c.WeightDecay)
	}
	if c.ClipNorm == 0 {
		c.ClipNorm = 1
	}
	if c.GradAccum == 0 {
		c.GradAccum = 1
	}
	if c.DivergenceFactor == 0 {
		c.DivergenceFactor = 100
	}
	if c.MaxUpdateRatio == 0 {
		c.MaxUpdateRatio = 100
	}
	if math.IsNaN(c.DivergenceFactor) || math.IsNaN(c.MaxUpdateRatio) || (c.DivergenceFactor > 0 && c.DivergenceFactor <= 1) {
		return c, fmt.Errorf("peft.TrainConfig: DivergenceFactor must be > 1 (or negative to disable), got %g; MaxUpdateRatio a number, got %g", c.DivergenceFactor, c.MaxUpdateRatio)
	}
	if c.GradAccum < 0 {
		return c, fmt.Errorf("peft.TrainConfig: GradAccum must be ≥ 1, got %d", c.GradAccum)
	}
	if c.LogEvery <= 0 {
		c.LogEvery = max(1, c.Steps/10)
	}
	if c.Output == nil {
		c.Output = os.Stdout
	}
	if err := c.schedule().Validate(); err != nil {
		return c, fmt.Errorf("peft.TrainConfig: %w", err)
	}
	return c, nil
}

func (c TrainConfig) schedule() Schedule {
	return Schedule{WarmupSteps: c.WarmupSteps, TotalSteps: c.Steps, Decay: c.Decay, MinRatio: c.MinLRRatio}
}

// Trainer trains a Model's method with GoMLX's training loop and our AdamW. One goroutine drives
// a trainer (its methods are not for concurrent use); while it trains, the model's calls, saves
// and merges wait. A dataset must not call the model it trains.
//
// Steps count from the model's first training step: a second Trainer on the same model continues
// its step count, schedule and optimizer state (to resume), and Train with Steps already reached
// is an error.
type Trainer struct {
	model        *Model
	graphVersion int // the model's graph version the trainer's graphs were built for
	cfg          TrainConfig
	trainer      *train.Trainer
	loop         *train.Loop
	losses       []float64
	microLosses  []float64 // the losses of the batches of the step being accumulated
	stepDur      []time.Duration
	skipped      int64 // steps the optimizer skipped for a non-finite gradient, as last seen
}

// optimizerValue reads a scalar the optimizer keeps (0 if it has none).
func (t *Trainer) optimizerValue(name string) float64 {
	v := t.model.ctx.GetVariableByScopeAndName(context.ScopeSeparator+optimizerScope, name)
	if v == nil {
		return 0
	}
	value, err := v.Value()
	if err != nil {
		return 0
	}
	switch x := value.Value().(type) {
	case int64:
		return float64(x)
	case float32:
		return float64(x)
	}
	return 0
}

// skipError says why the optimizer skipped step and what to do.
func (t *Trainer) skipError(step int) error {
	kept := "the weights are those after step " + fmt.Sprint(step-1)
	switch SkipReason(t.optimizerValue("skip_reason")) {
	case SkipLossGrew:
		loss, avg := t.optimizerValue("skip_loss"), t.optimizerValue("skip_loss_average")
		return fmt.Errorf("training stopped at step %d: the loss %.4g is %.0f× its running average %.4g, so the run is diverging; the step was not applied and %s: lower the learning rate (it is %g), or raise TrainConfig.DivergenceFactor",
			step, loss, loss/avg, avg, kept, t.cfg.LearningRate)
	case SkipLargeUpdate:
		return fmt.Errorf("training stopped at step %d: the update would change the weights by %.3g× their norm; the step was not applied and %s: lower the learning rate (it is %g), or raise TrainConfig.MaxUpdateRatio",
			step, t.optimizerValue("skip_update_ratio"), kept, t.cfg.LearningRate)
	case SkipNonFiniteUpdate:
		return fmt.Errorf("training stopped at step %d: the updated weights would not be finite; the step was not applied and %s: lower the learning rate (it is %g)", step, kept, t.cfg.LearningRate)
	case SkipNonFiniteLoss:
		return fmt.Errorf("training stopped at step %d: the loss is not finite (the step was not applied)", step)
	}
	return fmt.Errorf("training stopped at step %d: the gradient norm is not finite (the step was not applied)", step)
}

// skippedSteps reads the optimizer's count of skipped steps.
func (t *Trainer) skippedSteps() int64 { return int64(t.optimizerValue(skippedStepsName)) }

// syncGraphs drops the trainer's compiled graphs if the model was merged or unmerged since they
// were built: they would compute the old model.
func (t *Trainer) syncGraphs() {
	t.model.mu.Lock()
	version := t.model.graphVersion
	t.model.mu.Unlock()
	if version != t.graphVersion {
		t.trainer.ResetComputationGraphs()
		t.graphVersion = version
	}
}

// NewTrainer prepares to train model's method with cfg.
//
// It installs GEMM-form matmul gradients (package gemmgrad: the same values as GoMLX's rule, ~18×
// faster on the pure-Go backend) process-wide, unless the environment sets
// PEFT_GEMM_GRADIENTS=0.
func NewTrainer(model *Model, cfg TrainConfig) (*Trainer, error) {
	gemmgrad.EnableFromEnv()
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if model == nil {
		return nil, errors.New("peft.NewTrainer: nil model")
	}
	if model.method == nil {
		return nil, fmt.Errorf("peft.NewTrainer: the model has no method: nothing to train")
	}
	if len(model.TrainableVariables()) == 0 {
		return nil, fmt.Errorf("peft.NewTrainer: method %s has no trainable variables", model.method.Name())
	}
	for _, tv := range model.TrainableVariables() {
		if !(tv.LRScale > 0) || math.IsInf(tv.LRScale, 0) {
			return nil, fmt.Errorf("peft.NewTrainer: method %s gives %s a learning-rate multiplier of %g; it must be > 0 and finite",
				model.method.Name(), tv.Variable.ScopeAndName(), tv.LRScale)
		}
	}
	opt := &AdamW{
		LearningRate: cfg.LearningRate, Beta1: cfg.Beta1, Beta2: cfg.Beta2, Epsilon: cfg.Epsilon,
		WeightDecay: cfg.WeightDecay, ClipNorm: max(cfg.ClipNorm, 0), Schedule: cfg.schedule(),
		Variables: model.TrainableVariables, Accumulate: cfg.GradAccum,
		DivergenceFactor: max(cfg.DivergenceFactor, 0), MaxUpdateRatio: max(cfg.MaxUpdateRatio, 0),
	}
	if hook, ok := model.method.(GradientHook); ok {
		if cfg.GradAccum > 1 {
			return nil, fmt.Errorf("peft.NewTrainer: method %s watches each step's gradients and trains with GradAccum 1, not %d: raise the batch size instead", model.method.Name(), cfg.GradAccum)
		}
		opt.Gradients = hook
	}
	var evalMetrics []metrics.Interface
	if cfg.Accuracy {
		evalMetrics = append(evalMetrics, metrics.NewSparseCategoricalAccuracy("Accuracy", "acc"))
	}
	t := &Trainer{model: model, cfg: cfg, graphVersion: model.graphVersion}
	err = catch("peft.NewTrainer", func() error {
		if model.ctx.GetVariableByScopeAndName(context.RootScope, context.RNGStateVariableName) == nil {
			if err := model.ctx.SetRNGStateFromSeed(cfg.Seed); err != nil {
				return err
			}
		}
		t.trainer = train.NewTrainer(model.backend, model.ctx, model.Fn(), cfg.Loss, opt, nil, evalMetrics)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return t, nil
}

// newLoop returns a training loop with the trainer's hooks for one Train or TrainSteps call:
// GoMLX's progress bar ends with the loop's run, so each call needs its own.
func (t *Trainer) newLoop() *train.Loop {
	t.loop = train.NewLoop(t.trainer)
	t.attachProgress()
	return t.loop
}

// isTerminal reports whether f is a terminal (not merely a character device: /dev/null is one,
// and a progress bar there would stall a background run).
func isTerminal(f *os.File) bool { return term.IsTerminal(int(f.Fd())) }

func (t *Trainer) attachProgress() {
	mode := t.cfg.Progress
	if mode == ProgressAuto {
		mode = ProgressLines
		if t.cfg.Output == os.Stdout && isTerminal(os.Stdout) {
			mode = ProgressBar
		}
	}
	var last time.Time
	t.loop.OnStep("peft_record", 0, func(loop *train.Loop, m []*tensors.Tensor) error {
		loss := scalarFloat(m[0])
		if math.IsNaN(loss) || math.IsInf(loss, 0) {
			step := t.Step() // counts the step this batch ends, else the one before it
			if len(t.microLosses)+1 < t.cfg.GradAccum {
				step++
			}
			return fmt.Errorf("training stopped at step %d: the loss is %v (the step was not applied)", step, loss)
		}
		t.microLosses = append(t.microLosses, loss)
		if len(t.microLosses) < t.cfg.GradAccum {
			return nil
		}
		loss = mean(t.microLosses)
		t.microLosses = t.microLosses[:0]
		now := time.Now()
		if !last.IsZero() {
			t.stepDur = append(t.stepDur, now.Sub(last))
		}
		last = now
		step := t.Step()
		if skipped := t.skippedSteps(); skipped > t.skipped {
			t.skipped = skipped
			return t.skipError(step)
		}
		t.losses = append(t.losses, loss)
		if hook, ok := t.model.method.(StepHook); ok {
			if err := hook.AfterStep(t.model.ctx, step); err != nil {
				return fmt.Errorf("step %d: %s: %w", step, t.model.method.Name(), err)
			}
		}
		if mode == ProgressLines && (step%t.cfg.LogEvery == 0 || step == t.cfg.Steps) {
			_, _ = fmt.Fprintf(t.cfg.Output, "%s step %d/%d  loss %.4f\n", t.model.methodName(), step, t.cfg.Steps, loss)
		}
		return nil
	})
	if mode == ProgressBar {
		commandline.AttachProgressBar(t.loop)
	}
}

// checkedDataset checks each batch's inputs and labels against the model before the trainer
// uses it (Model.CheckInputs, Model.CheckLabels).
type checkedDataset struct {
	train.Dataset
	model *Model
	batch int
}

// checked wraps ds in a checkedDataset.
func (t *Trainer) checked(ds train.Dataset) train.Dataset {
	if c, ok := ds.(*checkedDataset); ok {
		return c
	}
	return &checkedDataset{Dataset: ds, model: t.model}
}

// Yield implements train.Dataset.
func (c *checkedDataset) Yield() (spec any, inputs, labels []*tensors.Tensor, err error) {
	spec, inputs, labels, err = c.Dataset.Yield()
	if err != nil {
		return
	}
	c.batch++
	if err := c.model.CheckInputs(inputs); err != nil {
		return nil, nil, nil, fmt.Errorf("batch %d of %s: %w", c.batch, c.Name(), err)
	}
	if err := c.model.CheckLabels(inputs, labels); err != nil {
		return nil, nil, nil, fmt.Errorf("batch %d of %s: %w", c.batch, c.Name(), err)
	}
	return spec, inputs, labels, nil
}

// IsOwnershipTransferred forwards the wrapped dataset's choice (train.DatasetCustomOwnership).
func (c *checkedDataset) IsOwnershipTransferred() bool {
	if o, ok := c.Dataset.(train.DatasetCustomOwnership); ok {
		return o.IsOwnershipTransferred()
	}
	return true
}

func mean(values []float64) float64 {
	sum := 0.0
	for _, v := range values {
		sum += v
	}
	return sum / float64(len(values))
}

// Step is the number of optimizer steps the model has taken (GoMLX's global step).
func (t *Trainer) Step() int {
	step := 0
	_ = catch("peft.Trainer.Step", func() error {
		step = int(optimizers.GetGlobalStep(t.model.ctx))
		return nil
	})
	return step
}

func scalarFloat(t *tensors.Tensor) float64 {
	switch v := t.Value().(type) {
	case float32:
		return float64(v)
	case float64:
		return v
	}
	return math.NaN()
}

// Train runs the remaining steps up to TrainConfig.Steps on ds (which should loop forever or be
// long enough) and returns the loss of each step taken so far.
func (t *Trainer) Train(ds train.Dataset) ([]float64, error) {
	t.model.state.Lock()
	defer t.model.state.Unlock()
	if t.model.isMerged() {
		return nil, ErrMerged
	}
	ds = t.checked(ds)
	t.syncGraphs()
	if step := optimizers.GetGlobalStep(t.model.ctx); step >= int64(t.cfg.Steps) {
		return nil, fmt.Errorf("peft.Trainer.Train: the model is already at step %d of Steps %d: raise Steps to train more", step, t.cfg.Steps)
	}
	err := catch("peft.Trainer.Train", func() error {
		_, err := t.newLoop().RunSteps(ds, (t.cfg.Steps-t.Step())*t.cfg.GradAccum)
		return err
	})
	return slices.Clone(t.losses), err
}

// TrainSteps runs n more steps (n·GradAccum batches) on ds, past TrainConfig.Steps if need be (the schedule then
// stays at its final value), and returns the loss of every step taken so far. Benchmarks use it
// to time steps one by one.
func (t *Trainer) TrainSteps(ds train.Dataset, n int) ([]float64, error) {
	t.model.state.Lock()
	defer t.model.state.Unlock()
	if t.model.isMerged() {
		return nil, ErrMerged
	}
	ds = t.checked(ds)
	t.syncGraphs()
	err := catch("peft.Trainer.TrainSteps", func() error {
		_, err := t.newLoop().RunSteps(ds, n*t.cfg.GradAccum)
		return err
	})
	return slices.Clone(t.losses), err
}

// Losses returns the training loss of each step taken so far: the objective the optimizer
// minimized, task loss plus the method's regularization terms (L2-SP, AdaLoRA's orthogonality).
func (t *Trainer) Losses() []float64 { return slices.Clone(t.losses) }

// MedianStepTime is the median wall time of a training step so far (the first, which compiles
// the graph, excluded).
func (t *Trainer) MedianStepTime() time.Duration {
	if len(t.stepDur) == 0 {
		return 0
	}
	d := slices.Clone(t.stepDur)
	slices.Sort(d)
	return d[len(d)/2]
}

// EvalResult is the outcome of evaluating a model on a dataset.
type EvalResult struct {
	// Loss is the mean task loss over the batches (regularization excluded).
	Loss float64
	// Accuracy is the classification accuracy, or NaN when TrainConfig.Accuracy is off.
	Accuracy float64
}

// Evaluate runs ds once (it must end with io.EOF) and returns the mean loss and accuracy. It
// evaluates the model as it is now, merged or not.
func (t *Trainer) Evaluate(ds train.Dataset) (EvalResult, error) {
	result := EvalResult{Loss: math.NaN(), Accuracy: math.NaN()}
	if d, ok := ds.(*Dataset); ok && d.loop {
		return result, fmt.Errorf("peft.Trainer.Evaluate: dataset %q loops forever; evaluate on one made with loop=false", d.name)
	}
	t.model.state.Lock()
	defer t.model.state.Unlock()
	t.syncGraphs()
	ds = t.checked(ds)
	err := catch("peft.Trainer.Evaluate", func() error {
		ds.Reset()
		values, err := t.trainer.Eval(ds)
		if err != nil {
			return err
		}
		// Eval returns the mean loss+regularization, the mean loss, then the metrics.
		if len(values) < 2 {
			return errors.New("evaluation returned no loss")
		}
		result.Loss = scalarFloat(values[1])
		if t.cfg.Accuracy && len(values) > 2 {
			result.Accuracy = scalarFloat(values[2])
		}
		return nil
	})
	return result, err
}

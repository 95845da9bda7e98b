package peft_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/adapter"
	"peft/lora"
	"peft/peft"
	"peft/peft/pefttest"
)

// A saved folder whose files are links to a device, or to files out of the folder, does not
// load, in either layout: the error names the file, and nothing is read from /dev/zero.
func TestLoadRefusesLinks(t *testing.T) {
	lora, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	_, loraModel := pefttest.StoriesModel(t, lora)
	bottleneck, err := adapter.New(adapter.Pfeiffer())
	require.NoError(t, err)
	_, adapterModel := pefttest.StoriesModel(t, bottleneck)
	for _, tc := range []struct {
		name string
		m    *peft.Model
		file string
	}{
		{"PEFT weights", loraModel, peft.AdapterWeightsFile},
		{"PEFT config", loraModel, peft.AdapterConfigFile},
		{"own config", adapterModel, peft.ConfigFile},
		{"own state", adapterModel, peft.StateFile},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			require.NoError(t, tc.m.Save(dir))
			// The file moved out of the folder and linked back: refused, though it is the right file.
			outside := filepath.Join(t.TempDir(), tc.file)
			require.NoError(t, os.Rename(filepath.Join(dir, tc.file), outside))
			require.NoError(t, os.Symlink(outside, filepath.Join(dir, tc.file)))
			err := tc.m.Load(dir)
			require.ErrorContains(t, err, tc.file+" is a symbolic link out of the folder")
			require.NoError(t, os.Remove(filepath.Join(dir, tc.file)))
			require.NoError(t, os.Symlink("/dev/zero", filepath.Join(dir, tc.file)))
			err = tc.m.Load(dir)
			require.Error(t, err)
			require.Contains(t, err.Error(), tc.file)
		})
	}
}

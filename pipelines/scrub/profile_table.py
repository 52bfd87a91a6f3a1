"""PS3.15 Annex E Table E.1-1, column "Basic Prof.": the Basic Application Level Confidentiality
Profile as data.

Neither pydicom nor highdicom ships this table, so it is kept here, extracted from the standard's
own Table E.1-1 "Application Level Confidentiality Profile Attributes" (PS3.15, 2020 edition),
one attribute per keyword as pydicom's data dictionary spells it. Action codes, PS3.15 E.1.1:

- ``X`` remove; ``Z`` zero length (or a dummy); ``D`` a non-zero dummy consistent with the VR;
- ``U`` a UID internally consistent within a set of instances;
- ``X/Z``, ``X/D``, ``X/Z/D``, ``Z/D``: the first unless IOD conformance needs the next;
- ``X/Z/U*``: remove, unless the sequence must stay, then replace the instance UIDs inside.

Rows without a fixed tag — Curve Data (50xx,xxxx), Overlay Data (60xx,3000), Overlay Comments
(60xx,4000) and every private attribute (odd group) — are ``X`` and handled by
:func:`action_for`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from pydicom.datadict import tag_for_keyword

#: X (271 attributes)
_REMOVE = """
AcquisitionComments AcquisitionProtocolDescription ActualHumanPerformersSequence
AdditionalPatientHistory AddressTrial AdmissionID AdmittingDate
AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime
AffectedSOPInstanceUID Allergies Arbitrary AuthorObserverSequence BeamDescription
BolusDescription BranchOfService CameraOwnerName CassetteID
ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialSeriesDescription
ClinicalTrialSeriesID ClinicalTrialTimePointDescription CommentsOnThePerformedProcedureStep
CompensatorDescription ConfidentialityConstraintOnPatientDataDescription
ConsultingPhysicianIdentificationSequence ContainerComponentID ContainerDescription
ContentCreatorIdentificationCodeSequence ContributionDescription CountryOfResidence
CurrentObserverTrial CurrentPatientLocation CurveDate CurveTime
CustodialOrganizationSequence DataSetTrailingPadding DecompositionDescription
DerivationDescription DeviceDescription DeviceSettingDescription DigitalSignaturesSequence
DischargeDiagnosisDescription DistributionAddress DistributionName DoseReferenceDescription
EntityDescription EntityName EquipmentFrameOfReferenceDescription EthnicGroup
ExpectedCompletionDateTime FixationDeviceDescription FractionGroupDescription FrameComments
GPSAltitude GPSAltitudeRef GPSAreaInformation GPSDOP GPSDateStamp GPSDestBearing
GPSDestBearingRef GPSDestDistance GPSDestDistanceRef GPSDestLatitude GPSDestLatitudeRef
GPSDestLongitude GPSDestLongitudeRef GPSDifferential GPSImgDirection GPSImgDirectionRef
GPSLatitude GPSLatitudeRef GPSLongitude GPSLongitudeRef GPSMapDatum GPSMeasureMode
GPSProcessingMethod GPSSatellites GPSSpeed GPSSpeedRef GPSStatus GPSTimeStamp GPSTrack
GPSTrackRef GPSVersionID GantryID GeneratorID HumanPerformerName HumanPerformerOrganization
IconImageSequence IdentifyingComments ImageComments ImagePresentationComments
ImagingServiceRequestComments Impressions InstanceCoercionDateTime InstanceOriginStatus
InstitutionAddress InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence
InsurancePlanIdentification IntendedRecipientsOfResultsIdentificationSequence
InterpretationApproverSequence InterpretationAuthor InterpretationDiagnosisDescription
InterpretationIDIssuer InterpretationRecorder InterpretationText InterpretationTranscriber
IssuerOfAdmissionID IssuerOfAdmissionIDSequence IssuerOfPatientID IssuerOfServiceEpisodeID
IssuerOfServiceEpisodeIDSequence LastMenstrualDate LensMake LensModel LensSerialNumber
LensSpecification LongDeviceDescription MAC MakerNote MedicalAlerts MedicalRecordLocator
MilitaryRank ModifiedAttributesSequence ModifiedImageDescription ModifyingDeviceID
MultienergyAcquisitionDescription NameOfPhysiciansReadingStudy
NamesOfIntendedRecipientsOfResults ObservationDateTrial ObservationTimeTrial Occupation
OrderCallbackPhoneNumber OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation
OriginalAttributesSequence OtherPatientIDs OtherPatientIDsSequence OtherPatientNames
OverlayDate OverlayTime ParticipantSequence PatientAddress PatientAge PatientBirthName
PatientBirthTime PatientComments PatientInstitutionResidence
PatientInsurancePlanCodeSequence PatientMotherBirthName PatientPrimaryLanguageCodeSequence
PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference PatientSize
PatientState PatientTelecomInformation PatientTelephoneNumbers PatientTransportArrangements
PatientWeight PerformedLocation PerformedProcedureStepDescription
PerformedProcedureStepEndDate PerformedProcedureStepEndDateTime
PerformedProcedureStepEndTime PerformedProcedureStepID PerformedProcedureStepStartDate
PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime PerformedStationAETitle
PerformedStationGeographicLocationCodeSequence PerformedStationName
PerformedStationNameCodeSequence PerformingPhysicianIdentificationSequence
PerformingPhysicianName PersonAddress PersonTelecomInformation PersonTelephoneNumbers
PhysicianApprovingInterpretation PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
PhysiciansReadingStudyIdentificationSequence PlateID PreMedication PregnancyStatus
PrescriptionDescription PriorTreatmentDoseDescription ProcedureStepCancellationDateTime
RTPlanDescription RTPlanName ReasonForOmissionDescription
ReasonForRequestedProcedureCodeSequence ReasonForStudy ReasonForTheImagingServiceRequest
ReasonForTheRequestedProcedure ReasonForVisit ReasonForVisitCodeSequence
ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence
ReferencedPatientPhotoSequence ReferencedPatientSequence ReferencedSOPInstanceMACSequence
ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence
RequestedContrastAgent RequestedProcedureComments RequestedProcedureID
RequestedProcedureLocation RequestingPhysician RequestingService
RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization ResponsiblePerson
ResultsComments ResultsDistributionListSequence ResultsIDIssuer
ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
ScheduledProcedureStepDescription ScheduledProcedureStepEndDate
ScheduledProcedureStepEndTime ScheduledProcedureStepExpirationDateTime
ScheduledProcedureStepLocation ScheduledProcedureStepModificationDateTime
ScheduledProcedureStepStartDate ScheduledProcedureStepStartDateTime
ScheduledProcedureStepStartTime ScheduledStationAETitle
ScheduledStationGeographicLocationCodeSequence ScheduledStationName
ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
SeriesDescription ServiceEpisodeDescription ServiceEpisodeID SetupTechniqueDescription
ShieldingDeviceDescription SlideIdentifier SmokingStatus SourceManufacturer SpecialNeeds
SpecimenAccessionNumber SpecimenDetailedDescription SpecimenShortDescription StudyComments
StudyDescription StudyIDIssuer TelephoneNumberTrial TextComments TextString
TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle TreatmentMachineName
UDISequence UniqueDeviceIdentifier VerbalSourceIdentifierCodeSequenceTrial VerbalSourceTrial
VisitComments XRayDetectorLabel
"""

#: Z (34 attributes)
_EMPTY = """
AccessionNumber ClinicalTrialCoordinatingCenterName ClinicalTrialProtocolName
ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialTimePointID
ConceptualVolumeCombinationDescription ConceptualVolumeDescription ConsultingPhysicianName
DeviceAlternateIdentifier FillerOrderNumberImagingServiceRequest FractionationNotes
IssuerOfTheContainerIdentifierSequence IssuerOfTheSpecimenIdentifierSequence
ManufacturerDeviceIdentifier PatientBirthDate PatientID PatientName PatientSex
PlacerOrderNumberImagingServiceRequest PrescriptionNotes PrescriptionNotesSequence
RTAccessoryDeviceSlotID RTAccessoryHolderSlotID RTPhysicianIntentNarrative
RadiationGenerationModeDescription ReasonForSuperseding ReferringPhysicianName
SpecimenPreparationSequence StudyDate StudyID StudyTime TreatmentTechniqueNotes
VerifyingObserverIdentificationCodeSequence
"""

#: D (43 attributes)
_DUMMY = """
ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID ClinicalTrialSponsorName
ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ContainerIdentifier ContentSequence
DeviceLabel EntityLabel EntityLongLabel FlowIdentifier FlowIdentifierSequence
FrameOriginTimestamp GraphicAnnotationSequence ImpedanceMeasurementDateTime
InterlockDateTime InterlockDescription InterlockOriginDescription OverrideDateTime
PersonIdentificationCodeSequence PersonName RTPlanLabel RTPrescriptionLabel
RTToleranceSetLabel RadiationDoseIdentificationLabel RadiationDoseInVivoMeasurementLabel
RadiationGenerationModeLabel RecordedRTControlPointDateTime SourceEndDateTime
SourceIdentifier SourceStartDateTime SpecimenIdentifier TreatmentPositionGroupLabel
TreatmentSite TreatmentToleranceViolationDateTime TreatmentToleranceViolationDescription
UserContentLabel UserContentLongLabel VerifyingObserverName VerifyingObserverSequence
VerifyingOrganization XRayDetectorID XRaySourceID
"""

#: U (50 attributes)
_UID = """
ConcatenationUID ConceptualVolumeUID ConstituentConceptualVolumeUID DeviceUID
DigitalSignatureUID DimensionOrganizationUID DoseReferenceUID DosimetricObjectiveUID
FailedSOPInstanceUIDList FiducialUID FrameOfReferenceUID InstanceCreatorUID
IrradiationEventUID LargePaletteColorLookupTableUID ManufacturerDeviceClassUID
MediaStorageSOPInstanceUID MultiplexGroupUID ObservationSubjectUIDTrial ObservationUID
PaletteColorLookupTableUID PatientSetupUID PresentationDisplayCollectionUID
PresentationSequenceCollectionUID RTTreatmentPhaseUID ReferencedConceptualVolumeUID
ReferencedDoseReferenceUID ReferencedDosimetricObjectiveUID ReferencedFiducialsUID
ReferencedFrameOfReferenceUID ReferencedGeneralPurposeScheduledProcedureStepTransactionUID
ReferencedObservationUIDTrial ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile
RelatedFrameOfReferenceUID RequestedSOPInstanceUID SOPInstanceUID SeriesInstanceUID
SourceConceptualVolumeUID SpecimenUID StorageMediaFileSetUID StudyInstanceUID
SynchronizationFrameOfReferenceUID TargetUID TemplateExtensionCreatorUID
TemplateExtensionOrganizationUID TrackingUID TransactionUID TreatmentPositionGroupUID
TreatmentSessionUID UID
"""

#: X/Z (10 attributes)
_REMOVE_OR_EMPTY = """
AcquisitionContextSequence AcquisitionDate AcquisitionTime BarcodeValue LabelText
PatientSexNeutered ReferencedStudySequence RequestedProcedureDescription ReviewerName
SourceSerialNumber
"""

#: X/D (17 attributes)
_REMOVE_OR_DUMMY = """
AcquisitionDeviceProcessingDescription DetectorID EndAcquisitionDateTime FirstTreatmentDate
IntendedPhaseEndDate IntendedPhaseStartDate MostRecentTreatmentDate
OperatorIdentificationSequence ProtocolName RTPlanDate RTPlanTime RTTreatmentApproachLabel
SeriesDate SeriesTime StartAcquisitionDateTime TreatmentDate TreatmentTime
"""

#: X/Z/D (7 attributes)
_REMOVE_EMPTY_OR_DUMMY = """
AcquisitionDateTime DeviceSerialNumber InstitutionCodeSequence InstitutionName OperatorsName
ReferencedPerformedProcedureStepSequence StationName
"""

#: Z/D (4 attributes)
_EMPTY_OR_DUMMY = """
ContentCreatorName ContentDate ContentTime ContrastBolusAgent
"""

#: X/Z/U* (2 attributes)
_REMOVE_EMPTY_OR_UIDS = """
ReferencedImageSequence SourceImageSequence
"""


def _table() -> Mapping[int, str]:
    table: dict[int, str] = {}
    for action, keywords in (
        ("X", _REMOVE),
        ("Z", _EMPTY),
        ("D", _DUMMY),
        ("U", _UID),
        ("X/Z", _REMOVE_OR_EMPTY),
        ("X/D", _REMOVE_OR_DUMMY),
        ("X/Z/D", _REMOVE_EMPTY_OR_DUMMY),
        ("Z/D", _EMPTY_OR_DUMMY),
        ("X/Z/U*", _REMOVE_EMPTY_OR_UIDS),
    ):
        for keyword in keywords.split():
            tag = tag_for_keyword(keyword)
            if tag is None:  # a typo here would silently keep an identifier: refuse to load
                raise RuntimeError(f"PS3.15 E.1-1 table: unknown DICOM keyword {keyword!r}")
            table[tag] = action
    return MappingProxyType(table)


#: Tag → action code of the Basic Profile for every attribute Table E.1-1 lists by tag.
BASIC_PROFILE: Final[Mapping[int, str]] = _table()


def action_for(tag: int) -> str | None:
    """Basic Profile action for ``tag``; ``None`` when the table does not list it (keep)."""
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 1:
        return "X"  # private attributes
    if 0x5000 <= group <= 0x50FF:
        return "X"  # curves (retired)
    if 0x6000 <= group <= 0x60FF and element in (0x3000, 0x4000):
        return "X"  # overlay data and overlay comments
    return BASIC_PROFILE.get(tag)
